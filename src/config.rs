//! Command-line flags (contract.md §1). Every flag also reads `ORCHARD_<FLAG_NAME>`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "orchard",
    version,
    about = "Apple device management (MDM + DDM) for large fleets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the MDM server and admin API.
    Serve(ServeArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Embedded,
    Scylla,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UserAuthenticateMode {
    /// Answer 410 Gone: network users are not managed.
    Decline,
    /// Accept every user with a zero-length DigestChallenge.
    EmptyChallenge,
}

#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// MDM + admin API listener.
    #[arg(long, env = "ORCHARD_LISTEN", default_value = "127.0.0.1:9004")]
    pub listen: String,

    /// Embedded store, generated CA and generated API key live here.
    #[arg(long, env = "ORCHARD_DATA_DIR", default_value = "./orchard-data")]
    pub data_dir: PathBuf,

    /// Admin API secret; generated on first start (and stored in the data dir) if absent.
    #[arg(long, env = "ORCHARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Serve HTTPS with this PEM certificate chain (requires --tls-key).
    #[arg(long, env = "ORCHARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "ORCHARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Header in which a trusted proxy passes the device's client certificate
    /// (RFC 9440 `:base64 DER:` or URL-escaped PEM).
    #[arg(long, env = "ORCHARD_CLIENT_CERT_HEADER")]
    pub client_cert_header: Option<String>,

    /// Extra CA bundle (PEM) that device identity certificates may chain to.
    #[arg(long, env = "ORCHARD_IDENTITY_CA")]
    pub identity_ca: Option<PathBuf>,

    /// An enrollment imported through `PUT /migration` binds the first identity
    /// certificate it presents (chaining to the identity CA), as NanoMDM's `-retro`;
    /// without it such an enrollment is refused until it re-enrolls.
    #[arg(long, env = "ORCHARD_RETRO")]
    pub retro: bool,

    /// Public https:// base URL devices use (ServerURL = <base>/mdm, CheckInURL = <base>/checkin).
    #[arg(long, env = "ORCHARD_SERVER_URL")]
    pub server_url: Option<String>,

    /// APNs endpoint override (tests, load runs); default Apple production.
    #[arg(long, env = "ORCHARD_APNS_URL")]
    pub apns_url: Option<String>,

    /// Extra root (PEM) to trust for --apns-url.
    #[arg(long, env = "ORCHARD_APNS_CA")]
    pub apns_ca: Option<PathBuf>,

    /// Use Apple's development APNs host (only for profiles with UseDevelopmentAPNS).
    #[arg(long, env = "ORCHARD_APNS_DEVELOPMENT")]
    pub apns_development: bool,

    /// Long-lived HTTP/2 connections per push topic.
    #[arg(long, env = "ORCHARD_APNS_CONNECTIONS", default_value_t = 2)]
    pub apns_connections: usize,

    /// apns-expiration: seconds APNs keeps a wake-up for an offline device.
    #[arg(long, env = "ORCHARD_APNS_EXPIRATION_SECS", default_value_t = 7 * 24 * 3600)]
    pub apns_expiration_secs: u64,

    /// Re-push a device with pending commands after this many quiet seconds.
    #[arg(long, env = "ORCHARD_REPUSH_AFTER_SECS", default_value_t = 300)]
    pub repush_after_secs: u64,

    /// Longest spacing between repeated re-pushes of one device.
    #[arg(long, env = "ORCHARD_REPUSH_MAX_SECS", default_value_t = 24 * 3600)]
    pub repush_max_secs: u64,

    /// How often the re-push sweep looks for due wakes.
    #[arg(long, env = "ORCHARD_REPUSH_INTERVAL_SECS", default_value_t = 30)]
    pub repush_interval_secs: u64,

    /// Storage backend.
    #[arg(long, env = "ORCHARD_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,

    /// ScyllaDB contact points for --store scylla.
    #[arg(long, env = "ORCHARD_SCYLLA_NODES", value_delimiter = ',')]
    pub scylla_nodes: Vec<String>,

    /// ScyllaDB keyspace for --store scylla (created, with every table, if missing).
    #[arg(long, env = "ORCHARD_SCYLLA_KEYSPACE", default_value = "orchard")]
    pub scylla_keyspace: String,

    /// Replication factor used when Orchard creates the keyspace.
    #[arg(long, env = "ORCHARD_SCYLLA_REPLICATION", default_value_t = 3)]
    pub scylla_replication: u32,

    /// Local datacenter: LOCAL_QUORUM is counted there and requests go to its replicas.
    #[arg(long, env = "ORCHARD_SCYLLA_DATACENTER")]
    pub scylla_datacenter: Option<String>,

    /// Database user (with --scylla-password).
    #[arg(long, env = "ORCHARD_SCYLLA_USER", requires = "scylla_password")]
    pub scylla_user: Option<String>,

    /// Database password (with --scylla-user).
    #[arg(
        long,
        env = "ORCHARD_SCYLLA_PASSWORD",
        hide_env_values = true,
        requires = "scylla_user"
    )]
    pub scylla_password: Option<String>,

    /// CA (PEM) of the database's TLS certificates: connect with TLS.
    #[arg(long, env = "ORCHARD_SCYLLA_CA")]
    pub scylla_ca: Option<PathBuf>,

    /// Milliseconds one database request (with its retries) may take; past it the
    /// device gets 503 and retries.
    #[arg(long, env = "ORCHARD_SCYLLA_TIMEOUT_MS", default_value_t = 5000)]
    pub scylla_timeout_ms: u64,

    /// Database requests in flight at most; more wait (backpressure).
    #[arg(long, env = "ORCHARD_SCYLLA_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub scylla_max_in_flight: usize,

    /// This node's stable name in the cluster (--store scylla); generated once and kept
    /// in the data directory when not given.
    #[arg(long, env = "ORCHARD_NODE_ID")]
    pub node_id: Option<String>,

    /// Base URL at which the other nodes reach this node's listener (default:
    /// http://<listen>).
    #[arg(long, env = "ORCHARD_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Secret shared by every node of a cluster; with --store scylla it makes this node a
    /// cluster member (shard leases, fenced writes) and authenticates node-to-node calls.
    #[arg(long, env = "ORCHARD_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,

    /// Shard lease length in seconds: a node that stops heartbeating loses its shards
    /// after this long.
    #[arg(long, env = "ORCHARD_LEASE_SECS", default_value_t = 10)]
    pub lease_secs: u64,

    /// Page cache of the embedded store, in MiB.
    #[arg(long, env = "ORCHARD_STORE_CACHE_MB", default_value_t = 256)]
    pub store_cache_mb: usize,

    /// Largest accepted request body.
    #[arg(long, env = "ORCHARD_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds a client may take to send its request headers or body.
    #[arg(long, env = "ORCHARD_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "ORCHARD_WORKERS")]
    pub workers: Option<usize>,

    /// Seconds without traffic after which a device actor leaves memory.
    #[arg(long, env = "ORCHARD_ACTOR_IDLE_SECS", default_value_t = 300)]
    pub actor_idle_secs: u64,

    /// Upper bound on device actors resident in memory.
    #[arg(long, env = "ORCHARD_MAX_RESIDENT_ACTORS", default_value_t = 200_000)]
    pub max_resident_actors: usize,

    /// Identity certificates whose verification is remembered (about 100 bytes each). A
    /// device whose certificate is not remembered costs a chain verification (tens of
    /// microseconds of CPU) per request, so size it to the fleet; 0 disables the cache.
    #[arg(
        long,
        env = "ORCHARD_IDENTITY_CACHE_ENTRIES",
        default_value_t = 1_000_000
    )]
    pub identity_cache_entries: usize,

    /// How to answer UserAuthenticate for macOS network users.
    #[arg(
        long,
        env = "ORCHARD_USER_AUTHENTICATE",
        value_enum,
        default_value = "decline"
    )]
    pub user_authenticate: UserAuthenticateMode,

    /// Sync doctor: seconds after `declaration-items` with no body fetched (or no status
    /// after fetches) that count as a stalled sync.
    #[arg(long, env = "ORCHARD_DDM_STALL_AFTER", default_value_t = 120)]
    pub ddm_stall_after: u64,

    /// Post a NanoMDM/MicroMDM-format webhook event for every accepted check-in and
    /// command report to this http:// or https:// URL (at least once, in order per
    /// enrollment).
    #[arg(long, env = "ORCHARD_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// Sign every webhook event: `X-Hmac-Signature` = base64 HMAC-SHA256 of the body
    /// under this key.
    #[arg(
        long,
        env = "ORCHARD_WEBHOOK_HMAC_KEY",
        hide_env_values = true,
        requires = "webhook_url"
    )]
    pub webhook_hmac_key: Option<String>,

    /// CA certificates (PEM) an https:// webhook receiver's certificate may chain to,
    /// beside the Mozilla roots: for a receiver behind a private CA.
    #[arg(long, env = "ORCHARD_WEBHOOK_CA", requires = "webhook_url")]
    pub webhook_ca: Option<PathBuf>,

    /// Webhook events not accepted by the receiver within this many seconds of the change
    /// they report are dropped (counted and logged).
    #[arg(long, env = "ORCHARD_WEBHOOK_MAX_AGE_SECS", default_value_t = 24 * 3600)]
    pub webhook_max_age_secs: u64,

    /// Seconds one webhook post may take (connect, send, status line) before it is
    /// retried.
    #[arg(long, env = "ORCHARD_WEBHOOK_TIMEOUT_SECS", default_value_t = 10)]
    pub webhook_timeout_secs: u64,

    /// AccessRights in generated enrollment profiles (1..=8191).
    #[arg(long, env = "ORCHARD_ACCESS_RIGHTS", default_value_t = 8191)]
    pub access_rights: u64,

    /// Organization name shown in enrollment profiles.
    #[arg(long, env = "ORCHARD_ORGANIZATION", default_value = "Orchard")]
    pub organization: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_without_flags_uses_the_contract_defaults() {
        let cli = Cli::try_parse_from(["orchard", "serve"]).unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.listen, "127.0.0.1:9004");
        assert_eq!(args.data_dir, PathBuf::from("./orchard-data"));
        assert_eq!(args.store, StoreKind::Embedded);
        assert_eq!(args.max_body_bytes, 1024 * 1024);
    }

    #[test]
    fn a_webhook_key_or_ca_without_a_webhook_url_is_refused() {
        assert!(Cli::try_parse_from(["orchard", "serve", "--webhook-hmac-key", "k"]).is_err());
        assert!(Cli::try_parse_from(["orchard", "serve", "--webhook-ca", "ca.pem"]).is_err());
        let cli = Cli::try_parse_from(["orchard", "serve", "--webhook-url", "http://h/"]).unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.webhook_max_age_secs, 24 * 3600);
    }

    #[test]
    fn retro_binding_is_off_unless_asked_for() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Serve(args) => args.retro,
        };
        assert!(!parse(&["orchard", "serve"]));
        assert!(parse(&["orchard", "serve", "--retro"]));
    }

    #[test]
    fn a_tls_certificate_without_its_key_is_refused() {
        assert!(Cli::try_parse_from(["orchard", "serve", "--tls-cert", "c.pem"]).is_err());
    }
}
