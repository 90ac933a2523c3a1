//! Orchard: an Apple device-management server (MDM + Declarative Device Management) for
//! large fleets. See ARCHITECTURE.md for the map of modules and the request flow.

pub mod cluster;
pub mod commands;
pub mod config;
pub mod ddm;
pub mod device;
pub mod enroll;
pub mod forward;
pub mod h2conn;
pub mod http;
pub mod identity;
pub mod outbound_tls;
pub mod protocol;
pub mod push;
pub mod schema;
pub mod server;
pub mod shared_state;
pub mod store;
pub mod telemetry;
pub mod webhook;
