//! A real, local APNs peer for exercising Orchard's MDM wake-ups.
//!
//! Orchard wakes devices by POSTing `{"mdm":"<PushMagic>"}` to APNs over HTTP/2 with the MDM
//! push certificate as TLS client certificate. Testing that path against a mock object would
//! skip exactly what breaks in production: TLS client authentication, HTTP/2 stream limits,
//! `GOAWAY` draining and APNs' error answers. [`ApnsPeer`] is therefore a genuine HTTP/2 over
//! TLS server that validates requests the way APNs does, answers valid ones according to a
//! scriptable [`Behavior`], and records everything it was sent.

mod config;
mod ledger;
mod peer;
mod request;
mod tls;

pub use config::{Behavior, Outcome, PeerConfig};
pub use ledger::{RecordedPush, RECENT_CAPACITY, SUBSCRIPTION_CAPACITY};
pub use peer::ApnsPeer;
pub use request::{PushRequest, MAX_PAYLOAD_BYTES};
