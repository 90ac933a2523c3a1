//! Webhook events, a drop-in for NanoMDM's and MicroMDM's: every accepted check-in and
//! command report is posted to `--webhook-url` as the JSON event NanoMDM's webhook sends,
//! signed like NanoMDM signs it (`X-Hmac-Signature`, with `--webhook-hmac-key`).
//!
//! Delivery is at least once, from a durable outbox. The device actor renders the event
//! and adds it to its enrollment's outbox in the same `Store::apply` batch as the change
//! the message made (`Mutation::PutWebhookEvent`), so no crash keeps one without the
//! other; then it tells the deliverer and answers the device. The deliverer posts each
//! enrollment's events in order, retries with backoff, drops events past
//! `--webhook-max-age-secs`, and removes what was accepted. Device requests never wait
//! for a receiver.
//!
//! * `event.rs` — the event shapes (NanoMDM's `event.json`) and the signature; pure.
//! * `client.rs` — posting one event over HTTP/1.1 or HTTPS.
//! * `deliver.rs` — the deliverer: which outboxes to drain, order, retries, age, metrics.

pub mod client;
mod deliver;
pub mod event;

pub use deliver::{Deliverer, Notifier, WebhookSettings};
