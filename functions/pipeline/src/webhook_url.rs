//! Webhook URLs checked against server-side request forgery (SSRF).
//!
//! A tenant chooses where our worker sends its webhooks, so a URL is an invitation to make us
//! call something on the inside: the cloud metadata service (credentials), a database with an
//! HTTP port, a router. [`validate_webhook_url`] refuses such URLs *after* resolving the name,
//! and returns the addresses it vetted so the sender connects to exactly those (a second
//! lookup at send time could answer differently: DNS rebinding).
//!
//! Rules:
//! - the URL parses (WHATWG rules, as browsers do: `https://2130706433/`, `https://0x7f.1/`
//!   and `https://017700000001/` are all 127.0.0.1, and are judged as such);
//! - scheme `https`; `http` only in [`Mode::Local`] and only when every address is loopback;
//! - no user name or password in the URL (authentication is the signature's job, and
//!   `https://good.example@evil/` misleads people reading it);
//! - not a cloud metadata host name (`metadata.google.internal`, `instance-data`, any
//!   `.internal` name, …), whatever it resolves to;
//! - the name resolves to at least one address, and *every* address is public unicast
//!   ([`classify_ip`]); loopback is allowed in [`Mode::Local`] only. IPv4-mapped, NAT64 and
//!   6to4 IPv6 forms are judged by the IPv4 address they carry.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use url::{Host, Url};

/// Longest accepted webhook URL.
pub const MAX_URL_LEN: usize = 2048;

/// Where the sender runs, which decides whether loopback receivers are fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `sightline serve` on someone's machine: a receiver on the same machine is the point,
    /// and plain http to it is allowed.
    Local,
    /// The deployed service: loopback is the Lambda's own sandbox, never a receiver.
    Aws,
}

/// Name resolution, injectable so tests never ask real DNS.
#[async_trait]
pub trait Resolve: Send + Sync {
    /// Every address of `host` (a domain name, never an IP literal).
    async fn resolve(&self, host: &str) -> std::io::Result<Vec<IpAddr>>;
}

/// How long resolving a webhook's host may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The system resolver (getaddrinfo through `tokio::net::lookup_host`), with a time limit so
/// a slow DNS server cannot hold a request or a worker.
#[derive(Debug, Clone, Copy)]
pub struct SystemResolver {
    pub timeout: Duration,
}

impl Default for SystemResolver {
    fn default() -> SystemResolver {
        SystemResolver {
            timeout: RESOLVE_TIMEOUT,
        }
    }
}

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        // The port is irrelevant to the answer; lookup_host wants one.
        let lookup = tokio::net::lookup_host((host, 0));
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(addrs) => Ok(addrs?.map(|a| a.ip()).collect()),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", self.timeout.as_secs()),
            )),
        }
    }
}

/// Why an address is not one we send webhooks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// 169.254.169.254 and friends: instance credentials live there.
    CloudMetadata,
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7, fec0::/10.
    Private,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// 0.0.0.0, `::`.
    Unspecified,
    /// 0/8: "this network".
    ThisNetwork,
    /// 100.64/10: carrier-grade NAT.
    SharedAddressSpace,
    Broadcast,
    Multicast,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// 198.18/15, 2001:2::/48.
    Benchmarking,
    /// Anything else that is not public unicast (240/4, 192.0.0/24, IPv6 outside 2000::/3,
    /// IPv4-compatible IPv6, Teredo and the IETF block 2001::/23, …).
    Reserved,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Blocked::CloudMetadata => "a cloud metadata address",
            Blocked::Loopback => "a loopback address",
            Blocked::Private => "a private address",
            Blocked::LinkLocal => "a link-local address",
            Blocked::Unspecified => "the unspecified address",
            Blocked::ThisNetwork => "a \"this network\" address",
            Blocked::SharedAddressSpace => "a carrier-grade NAT address",
            Blocked::Broadcast => "the broadcast address",
            Blocked::Multicast => "a multicast address",
            Blocked::Documentation => "a documentation address",
            Blocked::Benchmarking => "a benchmarking address",
            Blocked::Reserved => "a reserved, non-public address",
        })
    }
}

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Parse(#[from] url::ParseError),
    #[error("the URL is longer than {MAX_URL_LEN} characters")]
    TooLong,
    #[error("scheme `{0}`: webhooks are sent over https")]
    Scheme(String),
    #[error("plain http is allowed only to this machine in local mode; use https")]
    HttpNotLoopback,
    #[error("a user name or password in the URL is not allowed; receivers check the signature")]
    Userinfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("port 0 cannot be connected to")]
    PortZero,
    #[error("`{0}` is a cloud metadata host name")]
    MetadataName(String),
    #[error("cannot resolve `{host}`: {message}")]
    Resolve { host: String, message: String },
    #[error("`{0}` resolves to no address")]
    NoAddress(String),
    #[error("`{host}` is {reason} ({addr})")]
    Blocked {
        host: String,
        addr: IpAddr,
        reason: Blocked,
    },
}

/// Host names of metadata services, refused before any lookup: inside a cloud they resolve to
/// the metadata address, and a resolver elsewhere may not say so.
const METADATA_NAMES: [&str; 6] = [
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.internal",
];

fn is_metadata_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    // `.internal` is reserved for private networks (ICANN, 2024): never a tenant's receiver.
    METADATA_NAMES.contains(&host.as_str()) || host.ends_with(".internal")
}

/// Check a webhook URL and return the socket addresses the sender may connect to (all of
/// them vetted; the sender must not resolve the name again). See the module docs for the
/// rules.
pub async fn validate_webhook_url(
    url: &str,
    mode: Mode,
    resolver: &dyn Resolve,
) -> Result<Vec<SocketAddr>, UrlError> {
    if url.len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    let parsed = Url::parse(url.trim())?;
    let http = match parsed.scheme() {
        "https" => false,
        "http" => true,
        other => return Err(UrlError::Scheme(other.to_string())),
    };
    if http && mode != Mode::Local {
        return Err(UrlError::HttpNotLoopback);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Userinfo);
    }
    let port = parsed.port_or_known_default().ok_or(UrlError::NoHost)?;
    if port == 0 {
        return Err(UrlError::PortZero);
    }
    let (name, ips) = match parsed.host().ok_or(UrlError::NoHost)? {
        Host::Ipv4(ip) => (ip.to_string(), vec![IpAddr::V4(ip)]),
        Host::Ipv6(ip) => (ip.to_string(), vec![IpAddr::V6(ip)]),
        Host::Domain(domain) => {
            if is_metadata_name(domain) {
                return Err(UrlError::MetadataName(domain.to_string()));
            }
            let ips = resolver
                .resolve(domain)
                .await
                .map_err(|e| UrlError::Resolve {
                    host: domain.to_string(),
                    message: e.to_string(),
                })?;
            (domain.to_string(), ips)
        }
    };
    if ips.is_empty() {
        return Err(UrlError::NoAddress(name));
    }

    let mut addrs: Vec<SocketAddr> = Vec::with_capacity(ips.len());
    let mut all_loopback = true;
    for ip in ips {
        match classify_ip(ip) {
            None => all_loopback = false,
            Some(Blocked::Loopback) if mode == Mode::Local => {}
            Some(reason) => {
                return Err(UrlError::Blocked {
                    host: name,
                    addr: ip,
                    reason,
                })
            }
        }
        let addr = SocketAddr::new(ip, port);
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if http && !all_loopback {
        return Err(UrlError::HttpNotLoopback);
    }
    Ok(addrs)
}

/// None when `ip` is public unicast, else why not. IPv6 forms that carry an IPv4 address
/// (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by it,
/// since that is where a packet to them ends up.
pub fn classify_ip(ip: IpAddr) -> Option<Blocked> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Blocked> {
    let [a, b, c, d] = ip.octets();
    let blocked = match (a, b, c, d) {
        // AWS, GCP and Azure IMDS; Azure's wire server; Alibaba's metadata service.
        (169, 254, 169, 254) | (168, 63, 129, 16) | (100, 100, 100, 200) => Blocked::CloudMetadata,
        (0, 0, 0, 0) => Blocked::Unspecified,
        (0, ..) => Blocked::ThisNetwork,
        (10, ..) => Blocked::Private,
        (172, 16..=31, ..) => Blocked::Private,
        (192, 168, ..) => Blocked::Private,
        (127, ..) => Blocked::Loopback,
        (169, 254, ..) => Blocked::LinkLocal,
        (100, 64..=127, ..) => Blocked::SharedAddressSpace,
        (192, 0, 2, _) | (198, 51, 100, _) | (203, 0, 113, _) => Blocked::Documentation,
        (198, 18..=19, ..) => Blocked::Benchmarking,
        // IETF protocol assignments; the deprecated 6to4 relay anycast.
        (192, 0, 0, _) | (192, 88, 99, _) => Blocked::Reserved,
        (224..=239, ..) => Blocked::Multicast,
        (255, 255, 255, 255) => Blocked::Broadcast,
        (240..=255, ..) => Blocked::Reserved,
        _ => return None,
    };
    Some(blocked)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Blocked> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(Blocked::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Blocked::Loopback);
    }
    // AWS's IMDS over IPv6 (inside fc00::/7, named apart for a clearer message).
    if s == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] {
        return Some(Blocked::CloudMetadata);
    }
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return classify_v4(embedded(s[1], s[2]));
    }
    if s[0] & 0xe000 != 0x2000 {
        // Outside global unicast 2000::/3: name the common cases, the rest is reserved
        // (IPv4-compatible ::a.b.c.d, NAT64 local-use 64:ff9b:1::/48, discard 100::/64, …).
        return Some(match s[0] {
            0xfc00..=0xfdff => Blocked::Private,
            0xfe80..=0xfebf => Blocked::LinkLocal,
            0xfec0..=0xfeff => Blocked::Private,
            0xff00..=0xffff => Blocked::Multicast,
            _ => Blocked::Reserved,
        });
    }
    if (s[0] == 0x2001 && s[1] == 0x0db8) || (s[0] == 0x3fff && s[1] < 0x1000) {
        return Some(Blocked::Documentation);
    }
    if s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0 {
        return Some(Blocked::Benchmarking);
    }
    // IETF protocol assignments 2001::/23, Teredo (2001::/32) among them.
    if s[0] == 0x2001 && s[1] < 0x0200 {
        return Some(Blocked::Reserved);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers from a fixed table and counts its calls; unknown names fail like NXDOMAIN.
    #[derive(Default)]
    struct FakeResolver {
        names: HashMap<String, Vec<IpAddr>>,
        calls: AtomicUsize,
    }

    impl FakeResolver {
        fn with(entries: &[(&str, &[&str])]) -> FakeResolver {
            FakeResolver {
                names: entries
                    .iter()
                    .map(|(n, ips)| {
                        (
                            n.to_string(),
                            ips.iter().map(|i| i.parse().unwrap()).collect(),
                        )
                    })
                    .collect(),
                calls: AtomicUsize::new(0),
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Resolve for FakeResolver {
        async fn resolve(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.names
                .get(host)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such host"))
        }
    }

    fn dns() -> FakeResolver {
        FakeResolver::with(&[
            ("hooks.example.com", &["8.8.8.8", "2606:4700::1111"]),
            ("localhost", &["127.0.0.1", "::1"]),
            ("internal.example.com", &["10.1.2.3"]),
            ("rebind.example.com", &["8.8.8.8", "169.254.169.254"]),
            ("empty.example.com", &[]),
        ])
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    async fn check(url: &str, mode: Mode) -> Result<Vec<SocketAddr>, UrlError> {
        validate_webhook_url(url, mode, &dns()).await
    }

    async fn blocked_reason(url: &str, mode: Mode) -> Blocked {
        match check(url, mode).await {
            Err(UrlError::Blocked { reason, .. }) => reason,
            other => panic!("{url}: expected a blocked address, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn https_to_public_addresses_returns_every_vetted_address_with_its_port() {
        assert_eq!(
            check("https://hooks.example.com/sightline", Mode::Aws).await,
            Ok(vec![sock("8.8.8.8:443"), sock("[2606:4700::1111]:443")])
        );
        assert_eq!(
            check("https://hooks.example.com:8443/x?y=1", Mode::Aws).await,
            Ok(vec![sock("8.8.8.8:8443"), sock("[2606:4700::1111]:8443")])
        );
    }

    #[tokio::test]
    async fn other_schemes_are_refused() {
        for url in [
            "ftp://hooks.example.com/",
            "file:///etc/passwd",
            "gopher://hooks.example.com/",
            "ws://hooks.example.com/",
            "javascript:alert(1)",
        ] {
            assert!(
                matches!(check(url, Mode::Local).await, Err(UrlError::Scheme(_))),
                "{url}"
            );
        }
        assert!(matches!(
            check("not a url", Mode::Aws).await,
            Err(UrlError::Parse(_))
        ));
    }

    #[tokio::test]
    async fn plain_http_is_refused_in_aws_mode_even_to_public_hosts() {
        assert_eq!(
            check("http://hooks.example.com/", Mode::Aws).await,
            Err(UrlError::HttpNotLoopback)
        );
        assert_eq!(
            check("http://localhost:8080/", Mode::Aws).await,
            Err(UrlError::HttpNotLoopback)
        );
    }

    #[tokio::test]
    async fn plain_http_in_local_mode_is_allowed_only_to_loopback() {
        assert_eq!(
            check("http://localhost:8080/hook", Mode::Local).await,
            Ok(vec![sock("127.0.0.1:8080"), sock("[::1]:8080")])
        );
        assert_eq!(
            check("http://127.0.0.1/", Mode::Local).await,
            Ok(vec![sock("127.0.0.1:80")])
        );
        assert_eq!(
            check("http://hooks.example.com/", Mode::Local).await,
            Err(UrlError::HttpNotLoopback)
        );
    }

    #[tokio::test]
    async fn loopback_is_allowed_in_local_mode_only() {
        assert_eq!(
            check("https://localhost/", Mode::Local).await,
            Ok(vec![sock("127.0.0.1:443"), sock("[::1]:443")])
        );
        assert_eq!(
            blocked_reason("https://localhost/", Mode::Aws).await,
            Blocked::Loopback
        );
        assert_eq!(
            blocked_reason("https://[::1]/", Mode::Aws).await,
            Blocked::Loopback
        );
        assert_eq!(
            blocked_reason("https://127.9.9.9/", Mode::Aws).await,
            Blocked::Loopback
        );
    }

    #[tokio::test]
    async fn credentials_in_the_url_are_refused() {
        for url in [
            "https://user:pw@hooks.example.com/",
            "https://user@hooks.example.com/",
            "https://:pw@hooks.example.com/",
            "https://hooks.example.com@169.254.169.254/",
        ] {
            assert_eq!(
                check(url, Mode::Aws).await,
                Err(UrlError::Userinfo),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn private_addresses_are_refused_in_both_modes() {
        for url in [
            "https://10.0.0.1/",
            "https://172.16.0.1/",
            "https://172.31.255.255/",
            "https://192.168.1.1/",
            "https://[fc00::1]/",
            "https://[fd12:3456::1]/",
            "https://[fec0::1]/",
            "https://internal.example.com/",
        ] {
            for mode in [Mode::Aws, Mode::Local] {
                assert_eq!(blocked_reason(url, mode).await, Blocked::Private, "{url}");
            }
        }
        // Just outside 172.16/12.
        assert!(check("https://172.15.255.255/", Mode::Aws).await.is_ok());
        assert!(check("https://172.32.0.1/", Mode::Aws).await.is_ok());
    }

    #[tokio::test]
    async fn link_local_and_cloud_metadata_addresses_are_refused() {
        assert_eq!(
            blocked_reason("https://169.254.1.1/", Mode::Local).await,
            Blocked::LinkLocal
        );
        assert_eq!(
            blocked_reason("https://[fe80::1]/", Mode::Aws).await,
            Blocked::LinkLocal
        );
        for url in [
            "https://169.254.169.254/latest/meta-data/",
            "https://[fd00:ec2::254]/",
            "https://168.63.129.16/",
            "https://100.100.100.200/",
        ] {
            for mode in [Mode::Aws, Mode::Local] {
                assert_eq!(
                    blocked_reason(url, mode).await,
                    Blocked::CloudMetadata,
                    "{url}"
                );
            }
        }
    }

    #[tokio::test]
    async fn metadata_host_names_are_refused_without_a_lookup() {
        let dns = dns();
        for url in [
            "https://metadata.google.internal/computeMetadata/v1/",
            "https://METADATA.google.internal./",
            "https://metadata/",
            "https://instance-data/",
            "https://anything.internal/",
        ] {
            assert!(
                matches!(
                    validate_webhook_url(url, Mode::Local, &dns).await,
                    Err(UrlError::MetadataName(_))
                ),
                "{url}"
            );
        }
        assert_eq!(dns.calls(), 0);
    }

    #[tokio::test]
    async fn special_purpose_ranges_are_refused() {
        let cases = [
            ("https://0.0.0.0/", Blocked::Unspecified),
            ("https://[::]/", Blocked::Unspecified),
            ("https://0.1.2.3/", Blocked::ThisNetwork),
            ("https://255.255.255.255/", Blocked::Broadcast),
            ("https://224.0.0.1/", Blocked::Multicast),
            ("https://239.255.255.250/", Blocked::Multicast),
            ("https://[ff02::1]/", Blocked::Multicast),
            ("https://100.64.0.1/", Blocked::SharedAddressSpace),
            ("https://100.127.255.255/", Blocked::SharedAddressSpace),
            ("https://192.0.2.1/", Blocked::Documentation),
            ("https://198.51.100.7/", Blocked::Documentation),
            ("https://203.0.113.9/", Blocked::Documentation),
            ("https://[2001:db8::1]/", Blocked::Documentation),
            ("https://[3fff::1]/", Blocked::Documentation),
            ("https://198.18.0.1/", Blocked::Benchmarking),
            ("https://[2001:2::1]/", Blocked::Benchmarking),
            ("https://240.0.0.1/", Blocked::Reserved),
            ("https://192.0.0.170/", Blocked::Reserved),
            ("https://[2001::1]/", Blocked::Reserved),
            ("https://[100::1]/", Blocked::Reserved),
        ];
        for (url, reason) in cases {
            assert_eq!(blocked_reason(url, Mode::Aws).await, reason, "{url}");
        }
        assert!(check("https://100.128.0.1/", Mode::Aws).await.is_ok());
    }

    #[tokio::test]
    async fn ipv6_forms_carrying_an_ipv4_address_are_judged_by_it() {
        let cases = [
            ("https://[::ffff:127.0.0.1]/", Blocked::Loopback),
            ("https://[::ffff:169.254.169.254]/", Blocked::CloudMetadata),
            ("https://[::ffff:10.0.0.1]/", Blocked::Private),
            ("https://[::ffff:a9fe:a9fe]/", Blocked::CloudMetadata),
            ("https://[64:ff9b::a9fe:a9fe]/", Blocked::CloudMetadata),
            ("https://[64:ff9b::10.0.0.1]/", Blocked::Private),
            ("https://[2002:a9fe:a9fe::1]/", Blocked::CloudMetadata),
            ("https://[2002:7f00:1::]/", Blocked::Loopback),
            // IPv4-compatible (deprecated): not global unicast, refused outright.
            ("https://[::127.0.0.1]/", Blocked::Reserved),
            ("https://[::8.8.8.8]/", Blocked::Reserved),
        ];
        for (url, reason) in cases {
            assert_eq!(blocked_reason(url, Mode::Aws).await, reason, "{url}");
        }
        assert_eq!(
            check("https://[::ffff:8.8.8.8]/", Mode::Aws).await,
            Ok(vec![sock("[::ffff:8.8.8.8]:443")])
        );
        assert!(check("https://[2002:0808:0808::1]/", Mode::Aws)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn decimal_octal_and_hex_ipv4_hosts_are_read_as_the_address_they_mean() {
        let dns = dns();
        for url in [
            "https://2130706433/",
            "https://0x7f.1/",
            "https://0x7f000001/",
            "https://017700000001/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://%31%32%37.0.0.1/",
            "https://%6c%6f%63%61%6c%68%6f%73%74/",
        ] {
            match validate_webhook_url(url, Mode::Aws, &dns).await {
                Err(UrlError::Blocked { addr, reason, .. }) => {
                    assert_eq!(reason, Blocked::Loopback, "{url}");
                    assert!(addr.is_loopback(), "{url}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        assert_eq!(
            blocked_reason("https://0251.0376.0251.0376/", Mode::Aws).await,
            Blocked::CloudMetadata
        );
        assert_eq!(
            blocked_reason("https://2852039166/", Mode::Aws).await,
            Blocked::CloudMetadata
        );
        assert_eq!(
            check("http://0x7f.1:9000/", Mode::Local).await,
            Ok(vec![sock("127.0.0.1:9000")])
        );
        assert_eq!(
            check("http://2130706433/", Mode::Local).await,
            Ok(vec![sock("127.0.0.1:80")])
        );
    }

    #[tokio::test]
    async fn ip_literals_are_not_sent_to_the_resolver() {
        let dns = dns();
        assert!(validate_webhook_url("https://8.8.8.8/", Mode::Aws, &dns)
            .await
            .is_ok());
        assert!(
            validate_webhook_url("https://[2606:4700::1111]/", Mode::Aws, &dns)
                .await
                .is_ok()
        );
        assert_eq!(dns.calls(), 0);
    }

    #[tokio::test]
    async fn a_name_with_any_bad_address_is_refused_whole() {
        match check("https://rebind.example.com/", Mode::Aws).await {
            Err(UrlError::Blocked {
                host, addr, reason, ..
            }) => {
                assert_eq!(host, "rebind.example.com");
                assert_eq!(addr, "169.254.169.254".parse::<IpAddr>().unwrap());
                assert_eq!(reason, Blocked::CloudMetadata);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn unresolvable_or_addressless_names_are_refused() {
        assert!(matches!(
            check("https://nowhere.example.com/", Mode::Aws).await,
            Err(UrlError::Resolve { .. })
        ));
        assert_eq!(
            check("https://empty.example.com/", Mode::Aws).await,
            Err(UrlError::NoAddress("empty.example.com".into()))
        );
    }

    #[tokio::test]
    async fn port_zero_and_over_long_urls_are_refused() {
        assert_eq!(
            check("https://hooks.example.com:0/", Mode::Aws).await,
            Err(UrlError::PortZero)
        );
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(check(&long, Mode::Aws).await, Err(UrlError::TooLong));
    }

    #[tokio::test]
    async fn error_messages_name_the_host_and_the_reason() {
        let err = check("https://internal.example.com/", Mode::Aws)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`internal.example.com` is a private address (10.1.2.3)"
        );
    }

    #[test]
    fn public_unicast_passes_the_classifier() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.215.14",
            "2606:4700::1111",
            "2a00:1450::1",
        ] {
            assert_eq!(classify_ip(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[tokio::test]
    async fn the_system_resolver_answers_for_localhost_without_public_dns() {
        let r = SystemResolver::default();
        let ips = r.resolve("localhost").await.unwrap();
        assert!(!ips.is_empty());
        assert!(ips.iter().all(IpAddr::is_loopback), "{ips:?}");
        assert!(validate_webhook_url("http://localhost:1/", Mode::Local, &r)
            .await
            .is_ok());
    }
}
