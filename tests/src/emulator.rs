//! AWS emulator harness for integration tests.
//!
//! [`Emulator::start`] gives an S3 + SQS + DynamoDB endpoint on
//! `http://127.0.0.1:PORT`, chosen in this order:
//!
//! 1. `SIGHTLINE_AWS_ENDPOINT=http://127.0.0.1:4566` — use an emulator that is
//!    already running (no container is started; handy for debugging).
//! 2. `SIGHTLINE_EMULATOR_IMAGE=IMAGE[:TAG]` — start that image, e.g.
//!    `localstack/localstack:latest` on a machine that can pull it.
//! 3. Default: the offline moto image [`DEFAULT_IMAGE`], built by
//!    `scripts/build-emulator-image.sh` (needs Docker: `scripts/docker-up.sh`).
//!
//! Containers run with **host networking** (the test machines' dockerd has no
//! bridge) and bind `127.0.0.1` on a free port picked at run time, passed in
//! through the environment (`PORT` for moto, `GATEWAY_LISTEN` for LocalStack).
//! Testcontainers' mapped-port API does not apply in host mode.
//!
//! Account ids differ between emulators (moto: `123456789012`, LocalStack:
//! `000000000000`): read ARNs back from the emulator (e.g. the `QueueArn`
//! queue attribute) instead of building them.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use testcontainers::bollard::Docker;
use testcontainers::core::WaitFor;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The offline moto image built by `scripts/build-emulator-image.sh`.
pub const DEFAULT_IMAGE: &str = "sightline/moto-emulator:5";
/// Env var: image to run instead of [`DEFAULT_IMAGE`].
pub const ENV_IMAGE: &str = "SIGHTLINE_EMULATOR_IMAGE";
/// Env var: endpoint of an already-running emulator (no container is started).
pub const ENV_ENDPOINT: &str = "SIGHTLINE_AWS_ENDPOINT";
/// Region used for every emulator client.
pub const REGION: &str = "us-east-1";
/// Static test credentials (accepted by moto and LocalStack alike).
pub const ACCESS_KEY_ID: &str = "test";
pub const SECRET_ACCESS_KEY: &str = "test";

/// Label put on every emulator container (`docker ps -f label=sightline.emulator`).
const CONTAINER_LABEL: &str = "sightline.emulator";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: u32 = 3;

/// Which emulator implementation is behind the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// moto server (`moto_server`), the offline default.
    Moto,
    /// LocalStack (`localstack/localstack`).
    LocalStack,
}

impl Flavor {
    fn for_image(name: &str) -> Flavor {
        if name.to_ascii_lowercase().contains("localstack") {
            Flavor::LocalStack
        } else {
            Flavor::Moto
        }
    }

    /// Path that answers 200 once the emulator serves requests.
    fn health_path(self) -> &'static str {
        match self {
            Flavor::Moto => "/moto-api/",
            Flavor::LocalStack => "/_localstack/health",
        }
    }
}

/// A running (or external) AWS emulator. Dropping it stops and removes the
/// container, if one was started.
pub struct Emulator {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    /// What is serving `endpoint`.
    pub flavor: Flavor,
    /// `None` when `SIGHTLINE_AWS_ENDPOINT` points at an external emulator.
    container: Option<ContainerAsync<GenericImage>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("endpoint", &self.endpoint)
            .field("flavor", &self.flavor)
            .field(
                "container",
                &self.container.as_ref().map(|c| c.id().to_string()),
            )
            .finish()
    }
}

impl Emulator {
    /// Start an emulator (or attach to `SIGHTLINE_AWS_ENDPOINT`) and wait until
    /// it answers HTTP. Fails loudly (never skips) when Docker or the image is
    /// missing, naming the script that fixes it.
    pub async fn start() -> Result<Emulator> {
        if let Some(endpoint) = non_empty_env(ENV_ENDPOINT) {
            let endpoint = endpoint.trim_end_matches('/').to_string();
            let flavor = detect_flavor(&endpoint).await;
            wait_http_ready(&endpoint, flavor.health_path(), READY_TIMEOUT)
                .await
                .with_context(|| {
                    format!("{ENV_ENDPOINT}={endpoint} is set but no emulator answers there")
                })?;
            return Ok(Emulator {
                endpoint,
                flavor,
                container: None,
            });
        }

        let image = non_empty_env(ENV_IMAGE).unwrap_or_else(|| DEFAULT_IMAGE.to_string());
        let (name, tag) = split_image(&image);
        let flavor = Flavor::for_image(&name);
        preflight(&image).await?;

        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            match start_container(&name, &tag, flavor, port).await {
                Ok(container) => {
                    let endpoint = format!("http://127.0.0.1:{port}");
                    wait_http_ready(&endpoint, flavor.health_path(), READY_TIMEOUT)
                        .await
                        .with_context(|| {
                            format!("emulator container from {image} never became ready")
                        })?;
                    return Ok(Emulator {
                        endpoint,
                        flavor,
                        container: Some(container),
                    });
                }
                Err(e) => {
                    // Retry only what a new port can fix: the picked port was
                    // taken before the container bound it, so the emulator
                    // exited before logging readiness. Pull/create errors are final.
                    let msg = format!("{e:#}");
                    let retryable = !msg.contains("pull") && !msg.contains("No such image");
                    eprintln!(
                        "sightline emulator: attempt {attempt}/{START_ATTEMPTS} on port {port} failed: {msg}"
                    );
                    last_err = Some(e);
                    if !retryable {
                        break;
                    }
                }
            }
        }
        let e = last_err.expect("at least one attempt");
        Err(e.context(format!(
            "could not start the AWS emulator container ({image}).\n{}",
            HINTS
        )))
    }

    /// The port the emulator listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .unwrap_or(0)
    }

    /// Container id, if this harness started one.
    pub fn container_id(&self) -> Option<&str> {
        self.container.as_ref().map(|c| c.id())
    }

    /// Shorthand for [`sdk_config`]`(&self.endpoint)`.
    pub async fn sdk_config(&self) -> SdkConfig {
        sdk_config(&self.endpoint).await
    }
}

/// An `aws_config::SdkConfig` pointing at the emulator: region us-east-1,
/// static test credentials, `endpoint_url` set. For S3 also use
/// `aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true)`.
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            "sightline-emulator",
        ))
        .endpoint_url(endpoint)
        .load()
        .await
}

const HINTS: &str = concat!(
    "  - Docker must be running: run scripts/docker-up.sh\n",
    "  - the offline moto image must exist: run scripts/build-emulator-image.sh\n",
    "    (or set SIGHTLINE_EMULATOR_IMAGE=localstack/localstack:latest where that image can be pulled)\n",
    "  - or set SIGHTLINE_AWS_ENDPOINT=http://127.0.0.1:4566 to use an emulator that is already running",
);

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// `repo/name:tag` -> (`repo/name`, `tag`); no tag -> `latest`. A `:` inside a
/// registry host (`host:5000/name`) is not a tag separator.
fn split_image(image: &str) -> (String, String) {
    let image = image.trim();
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (
            image[..last_slash + i].to_string(),
            image[last_slash + i + 1..].to_string(),
        ),
        None => (image.to_string(), "latest".to_string()),
    }
}

/// Bind 127.0.0.1:0, read the port the kernel picked, release it.
fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0 to pick a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Docker reachable? Image present (the default image can't be pulled, so a
/// missing one is an error here rather than a doomed registry pull)?
async fn preflight(image: &str) -> Result<()> {
    let connect = || {
        Docker::connect_with_defaults()
            .with_context(|| format!("cannot connect to Docker.\n{HINTS}"))
    };
    // The Debian docker.io daemon may speak an older API than bollard's default.
    let docker = match connect()?.negotiate_version().await {
        Ok(d) => d,
        Err(_) => connect()?,
    };
    docker
        .ping()
        .await
        .with_context(|| format!("Docker is not running or not reachable.\n{HINTS}"))?;
    if image == DEFAULT_IMAGE {
        if let Err(e) = docker.inspect_image(image).await {
            bail!(
                "the emulator image {image} is not present ({e}).\n\
                 Build it (offline) with: scripts/build-emulator-image.sh\n\
                 (Docker itself: scripts/docker-up.sh)"
            );
        }
    }
    Ok(())
}

async fn start_container(
    name: &str,
    tag: &str,
    flavor: Flavor,
    port: u16,
) -> Result<ContainerAsync<GenericImage>> {
    let base = GenericImage::new(name, tag);
    let request = match flavor {
        Flavor::Moto => base
            .with_wait_for(WaitFor::message_on_either_std("Running on"))
            .with_env_var("PORT", port.to_string())
            .with_env_var("MOTO_HOST", "127.0.0.1"),
        Flavor::LocalStack => base
            .with_wait_for(WaitFor::message_on_stdout("Ready."))
            .with_env_var("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .with_env_var("LOCALSTACK_HOST", format!("127.0.0.1:{port}"))
            .with_env_var("SERVICES", "s3,sqs,dynamodb")
            .with_env_var("EAGER_SERVICE_LOADING", "1"),
    };
    let mut request = request
        .with_network("host")
        .with_label(CONTAINER_LABEL, "1")
        .with_startup_timeout(STARTUP_TIMEOUT);
    if non_empty_env("SIGHTLINE_EMULATOR_LOGS").is_some() {
        request = request.with_log_consumer(|frame: &testcontainers::core::logs::LogFrame| {
            eprint!("[emulator] {}", String::from_utf8_lossy(frame.bytes()));
        });
    }
    request.start().await.map_err(anyhow::Error::from)
}

/// Which emulator serves an external endpoint (LocalStack has a health path).
async fn detect_flavor(endpoint: &str) -> Flavor {
    match http_get_status(endpoint, Flavor::LocalStack.health_path()).await {
        Ok(200) => Flavor::LocalStack,
        _ => Flavor::Moto,
    }
}

/// Poll `GET endpoint+path` until it answers 200.
async fn wait_http_ready(endpoint: &str, path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get_status(endpoint, path).await {
            Ok(200) => return Ok(()),
            Ok(status) => format!("HTTP {status}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("GET {endpoint}{path} not ready after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Minimal HTTP/1.1 GET over plain TCP (the emulator is plain HTTP on
/// loopback); returns the status code.
async fn http_get_status(endpoint: &str, path: &str) -> Result<u16> {
    let authority = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("only http:// endpoints are supported, got {endpoint}"))?
        .trim_end_matches('/');
    let io = async {
        let mut stream = TcpStream::connect(authority).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: sightline-tests\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .context("timed out")??;
    let line = String::from_utf8_lossy(&buf);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {:?}", line.lines().next()))?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_references() {
        assert_eq!(
            split_image("sightline/moto-emulator:5"),
            ("sightline/moto-emulator".into(), "5".into())
        );
        assert_eq!(
            split_image("localstack/localstack"),
            ("localstack/localstack".into(), "latest".into())
        );
        assert_eq!(
            split_image("reg.example:5000/a/b:1.2"),
            ("reg.example:5000/a/b".into(), "1.2".into())
        );
        assert_eq!(
            split_image("reg.example:5000/a/b"),
            ("reg.example:5000/a/b".into(), "latest".into())
        );
    }

    #[test]
    fn flavor_from_image_name() {
        assert_eq!(
            Flavor::for_image("localstack/localstack"),
            Flavor::LocalStack
        );
        assert_eq!(Flavor::for_image("sightline/moto-emulator"), Flavor::Moto);
    }

    #[test]
    fn free_port_is_loopback_and_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
