//! One path and the methods it serves, as a single value: the router is built from it,
//! the 405 answer's `Allow` header is derived from it, and [`super::admin_routes`] lists
//! it for tests/openapi.rs to check the OpenAPI document against, so none of the three
//! can drift from the others.

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, FromRequest, Handler, HttpRequest, HttpResponse, ResponseError, Route};

use super::rejection::{Audience, Rejection};

/// A path with a handler per method.
pub struct Endpoint {
    path: String,
    routes: Vec<(Method, Route)>,
}

impl Endpoint {
    pub fn new(path: impl Into<String>) -> Self {
        Endpoint {
            path: path.into(),
            routes: Vec::new(),
        }
    }

    pub fn get<F, Args>(self, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        self.on(Method::GET, handler)
    }

    pub fn put<F, Args>(self, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        self.on(Method::PUT, handler)
    }

    pub fn post<F, Args>(self, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        self.on(Method::POST, handler)
    }

    pub fn delete<F, Args>(self, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        self.on(Method::DELETE, handler)
    }

    fn on<F, Args>(mut self, method: Method, handler: F) -> Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        let route = web::method(method.clone()).to(handler);
        self.routes.push((method, route));
        self
    }

    /// The path as registered (relative to the scope it is mounted in).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The methods served, in registration order.
    pub fn methods(&self) -> Vec<Method> {
        self.routes
            .iter()
            .map(|(method, _)| method.clone())
            .collect()
    }

    /// The path and its methods, as the route listings give them.
    pub fn listed(&self) -> (String, Vec<Method>) {
        (self.path.clone(), self.methods())
    }

    /// One actix resource for the path: a method it does not serve answers 405 with an
    /// `Allow` header naming the ones it does (actix's own 405 names none), worded for
    /// `audience`.
    pub fn into_resource(self, audience: Audience) -> actix_web::Resource {
        let allow = allow_header(&self.methods());
        let refuse = move |req: HttpRequest| {
            let allow = allow.clone();
            async move { method_not_allowed(&req, &allow, audience) }
        };
        self.routes
            .into_iter()
            .fold(web::resource(self.path), |resource, (_, route)| {
                resource.route(route)
            })
            .default_service(web::to(refuse))
    }
}

/// `GET, PUT`: the `Allow` header's value for `methods`.
fn allow_header(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn method_not_allowed(req: &HttpRequest, allow: &str, audience: Audience) -> HttpResponse {
    let detail = format!(
        "{} is not served at {}; use {allow}",
        req.method(),
        req.path()
    );
    let rejection = Rejection {
        audience,
        ..Rejection::api(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", detail)
    };
    let mut response = rejection.error_response();
    if let Ok(value) = header::HeaderValue::from_str(allow) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}
