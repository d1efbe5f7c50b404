//! Where the simulator delivers: a webhook URL, `http://` or `https://`, spoken to through one
//! pooled client (reqwest on rustls with the ring provider, as the services' OTLP export), that
//! trusts the system's roots plus an optional private CA (`--ca-file`, e.g. `.stack/tls/ca.pem`
//! in front of a TLS-terminating proxy).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

/// A webhook endpoint and the client that reaches it.
#[derive(Clone, Debug)]
pub struct Target {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl Target {
    /// `url` must be `http://` or `https://`; `ca_file` is a PEM bundle trusted besides the
    /// system's roots.
    pub fn new(url: &str, ca_file: Option<&Path>) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url}: only http:// and https:// URLs"));
        }
        // One process-wide provider: ring (reqwest is built without one).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .connect_timeout(Duration::from_secs(10))
            // Smartcar gives up on an answer after 15 s.
            .timeout(Duration::from_secs(15));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: not a PEM certificate bundle: {e}", path.display()))?;
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder.build().map_err(|e| format!("{url}: {e}"))?;
        Ok(Self {
            client,
            url: parsed,
        })
    }

    /// A plain-HTTP target at `addr` + `path` (the test suites' receivers).
    pub fn plain(addr: std::net::SocketAddr, path: &str) -> Self {
        Self::new(&format!("http://{addr}{path}"), None)
            .unwrap_or_else(|e| panic!("plain target: {e}"))
    }

    /// The URL deliveries go to.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// POSTs `body` with an optional `SC-Signature`: the status and the whole answer, or None when
    /// no answer came (refused, reset, TLS failure, timeout). The cause goes to stderr only in
    /// [`Target::exchange_or_cause`].
    pub async fn exchange(&self, body: Vec<u8>, signature: Option<&str>) -> Option<(u16, Bytes)> {
        self.exchange_or_cause(body, signature).await.ok()
    }

    /// As [`Target::exchange`], with the reason when no answer came.
    pub async fn exchange_or_cause(
        &self,
        body: Vec<u8>,
        signature: Option<&str>,
    ) -> Result<(u16, Bytes), String> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .body(body);
        if let Some(sig) = signature {
            req = req.header("SC-Signature", sig);
        }
        let res = req.send().await.map_err(|e| cause_chain(&e))?;
        let status = res.status().as_u16();
        let bytes = res.bytes().await.map_err(|e| cause_chain(&e))?;
        Ok((status, bytes))
    }
}

/// An error with its sources ("error sending request: … : invalid peer certificate: …").
fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}
