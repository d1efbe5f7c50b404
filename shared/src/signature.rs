//! `SC-Signature`: hex HMAC-SHA256 of the raw body under the Application Management Token.
//!
//! The only way to obtain a [`Verified`] body is [`ManagementTokens::verify`], so a body that did
//! not pass the check cannot reach the producer: the type says so. The token that matched last is
//! tried first, then the others in order, and the first that matches ends the check: which token
//! matched is no secret (it is logged and put in the record headers), so only the comparison itself
//! must be constant-time (`Mac::verify_slice`), and a delivery signed with the token Smartcar is
//! using costs one HMAC whatever the number of tokens, during a rotation too. Each token's key
//! schedule is computed once, when the list is built. The VERIFY challenge answer is the same HMAC,
//! which is why [`ManagementTokens::answer_challenge`] is guarded by the receiver (see
//! `SMARTCAR.md` §3).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the signature (matched case-insensitively, as all HTTP header names are).
pub const SIGNATURE_HEADER: &str = "sc-signature";

/// Why a delivery's signature was rejected. [`SignatureError::reason`] is the bounded metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no SC-Signature header")]
    Missing,
    #[error("SC-Signature is empty")]
    Empty,
    #[error("SC-Signature is {0} characters long, expected 64 lower-case hex characters")]
    WrongLength(usize),
    #[error("SC-Signature is not lower-case hex")]
    NotLowerHex,
    #[error("SC-Signature does not match any configured management token")]
    Mismatch,
}

impl SignatureError {
    /// Every value [`SignatureError::reason`] can take (metrics export each at 0 from start-up).
    pub const REASONS: [&'static str; 5] = [
        "missing",
        "empty",
        "wrong_length",
        "not_lower_hex",
        "mismatch",
    ];

    /// A stable, bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Empty => "empty",
            Self::WrongLength(_) => "wrong_length",
            Self::NotLowerHex => "not_lower_hex",
            Self::Mismatch => "mismatch",
        }
    }
}

/// A parsed signature: exactly 32 bytes written as 64 lower-case hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; 32]);

impl Signature {
    /// Parses the header value. Upper-case hex is refused: Smartcar sends lower-case, and accepting
    /// other spellings only widens what an attacker can try.
    pub fn parse(value: &[u8]) -> Result<Self, SignatureError> {
        if value.is_empty() {
            return Err(SignatureError::Empty);
        }
        if value.len() != 64 {
            return Err(SignatureError::WrongLength(value.len()));
        }
        if !value.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(SignatureError::NotLowerHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(value, &mut out).map_err(|_| SignatureError::NotLowerHex)?;
        Ok(Self(out))
    }
}

/// A body whose signature matched one of the configured tokens. Only [`ManagementTokens::verify`]
/// builds one.
#[derive(Debug, Clone)]
pub struct Verified {
    body: Bytes,
    token_index: usize,
}

impl Verified {
    /// The exact bytes that were signed.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Which configured token matched (0 = current). Never the token itself.
    pub fn token_index(&self) -> usize {
        self.token_index
    }

    /// Gives the bytes up, e.g. to the Kafka record.
    pub fn into_body(self) -> Bytes {
        self.body
    }
}

/// The configured Application Management Tokens, current first, then older ones still accepted
/// during a rotation. Never empty; never printed (`Debug` shows only the count).
#[derive(Clone)]
pub struct ManagementTokens {
    tokens: Vec<SecretString>,
    /// Each token's HMAC state after its key block, in the same order: a check clones one.
    keyed: Vec<HmacSha256>,
    /// The index of the token that matched last, tried first: while Smartcar signs with the second
    /// of two configured tokens (a rotation), a delivery costs one full-body HMAC instead of two.
    /// Which token matched is no secret (it is a record header); each comparison stays constant-time.
    last_match: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ManagementTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ManagementTokens({} configured, redacted)",
            self.tokens.len()
        )
    }
}

/// Why a token list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokensError {
    #[error("no management token configured")]
    None,
    #[error("token #{0} is empty")]
    EmptyToken(usize),
}

impl ManagementTokens {
    /// Builds the list, current token first. Refuses an empty list or an empty token.
    pub fn new(tokens: Vec<SecretString>) -> Result<Self, TokensError> {
        if tokens.is_empty() {
            return Err(TokensError::None);
        }
        if let Some(i) = tokens
            .iter()
            .position(|t| t.expose_secret().trim().is_empty())
        {
            return Err(TokensError::EmptyToken(i));
        }
        let keyed = tokens.iter().map(Self::mac).collect();
        Ok(Self {
            tokens,
            keyed,
            last_match: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Parses the comma-separated form used by `CARHOOK__SMARTCAR__MANAGEMENT_TOKENS`.
    pub fn from_csv(csv: &str) -> Result<Self, TokensError> {
        let list: Vec<SecretString> = csv
            .split(',')
            .map(|s| SecretString::from(s.trim().to_owned()))
            .collect();
        if csv.trim().is_empty() {
            return Err(TokensError::None);
        }
        Self::new(list)
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: an empty list cannot be built. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn mac(token: &SecretString) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        match HmacSha256::new_from_slice(token.expose_secret().as_bytes()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
        }
    }

    /// Checks `header` (the raw `SC-Signature` value, if any) against `body`: the token that
    /// matched last first, then the others in order, stopping at the first that matches; each
    /// comparison is constant-time.
    pub fn verify(&self, header: Option<&[u8]>, body: Bytes) -> Result<Verified, SignatureError> {
        let sig = Signature::parse(header.ok_or(SignatureError::Missing)?)?;
        self.first_match(&sig, &body, || {})
            .map(|token_index| Verified { body, token_index })
            .ok_or(SignatureError::Mismatch)
    }

    /// Index of the token whose HMAC of `body` is `sig`, trying the last matched one first;
    /// `computed` is called once per HMAC.
    fn first_match(
        &self,
        sig: &Signature,
        body: &[u8],
        mut computed: impl FnMut(),
    ) -> Option<usize> {
        let last = self
            .last_match
            .load(Ordering::Relaxed)
            .min(self.keyed.len() - 1);
        let order = std::iter::once(last).chain((0..self.keyed.len()).filter(|i| *i != last));
        for i in order {
            computed();
            let mut mac = self.keyed[i].clone();
            mac.update(body);
            if mac.verify_slice(&sig.0).is_ok() {
                if i != last {
                    self.last_match.store(i, Ordering::Relaxed);
                }
                return Some(i);
            }
        }
        None
    }

    /// Lower-case hex HMAC of `message` under the current token: the VERIFY challenge answer.
    /// Callers must apply the signing-oracle guard first.
    pub fn answer_challenge(&self, challenge: &str) -> String {
        let mut mac = self.keyed[0].clone();
        mac.update(challenge.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Lower-case hex HMAC-SHA256 of `body` under `token`: what Smartcar puts in `SC-Signature`.
pub fn sign(token: &SecretString, body: &[u8]) -> String {
    let mut mac = ManagementTokens::mac(token);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_for_the_metrics() {
        for e in [
            SignatureError::Missing,
            SignatureError::Empty,
            SignatureError::WrongLength(3),
            SignatureError::NotLowerHex,
            SignatureError::Mismatch,
        ] {
            assert!(SignatureError::REASONS.contains(&e.reason()), "{e:?}");
        }
    }

    fn tokens(list: &[&str]) -> ManagementTokens {
        match ManagementTokens::new(
            list.iter()
                .map(|t| SecretString::from(t.to_string()))
                .collect(),
        ) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn sdk_test_vectors() {
        let amt = tokens(&["amt"]);
        assert_eq!(
            amt.answer_challenge("challenge"),
            "9baf5a7464bd86740ad5a06e439dcf535a075022ed2c92d74efacf646d79328e"
        );
        let body = Bytes::from_static(br#"{"pizza":"pasta"}"#);
        let sig = b"4c05a8da471f05156ad717baa4017acd13a3a809850b9ca7d3301dcaaa854f70";
        let verified = amt.verify(Some(sig), body.clone());
        assert_eq!(verified.map(|v| v.token_index()), Ok(0));
    }

    #[test]
    fn rotation_reports_which_token_matched() {
        let pair = tokens(&["new", "old"]);
        let body = Bytes::from_static(b"{}");
        let by_old = sign(&SecretString::from("old".to_string()), &body);
        assert_eq!(
            pair.verify(Some(by_old.as_bytes()), body.clone())
                .map(|v| v.token_index()),
            Ok(1)
        );
        let by_other = sign(&SecretString::from("other".to_string()), &body);
        assert_eq!(
            pair.verify(Some(by_other.as_bytes()), body)
                .map(|v| v.token_index()),
            Err(SignatureError::Mismatch)
        );
    }

    /// Regression (issue 17): every token was hashed even after the first matched, so a delivery
    /// signed with the current token cost one full-body HMAC per configured token. And during a
    /// rotation, when Smartcar signs with a token later in the list, each delivery cost one HMAC per
    /// token before it: the last matched token is tried first.
    #[test]
    fn verification_stops_at_the_first_matching_token_trying_the_last_match_first() {
        let three = tokens(&["new", "old", "older"]);
        let body = b"{\"eventId\":\"e\"}";
        let count = |by: &str| {
            let sig = sign(&SecretString::from(by.to_string()), body);
            let sig = Signature::parse(sig.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            let mut n = 0;
            let matched = three.first_match(&sig, body, || n += 1);
            (matched, n)
        };
        assert_eq!(count("new"), (Some(0), 1));
        assert_eq!(count("old"), (Some(1), 2), "found after the current one");
        assert_eq!(count("old"), (Some(1), 1), "then tried first");
        assert_eq!(
            count("other"),
            (None, 3),
            "a mismatch tries every token once"
        );
        assert_eq!(count("older"), (Some(2), 3), "old, new, then older");
        assert_eq!(count("new"), (Some(0), 2), "older first, then new");
        assert_eq!(count("new"), (Some(0), 1));
    }

    #[test]
    fn malformed_signatures_are_named() {
        let t = tokens(&["amt"]);
        let b = Bytes::from_static(b"x");
        assert_eq!(
            t.verify(None, b.clone()).err(),
            Some(SignatureError::Missing)
        );
        assert_eq!(
            t.verify(Some(b""), b.clone()).err(),
            Some(SignatureError::Empty)
        );
        assert_eq!(
            t.verify(Some(b"abc"), b.clone()).err(),
            Some(SignatureError::WrongLength(3))
        );
        let upper = sign(&SecretString::from("amt".to_string()), &b).to_uppercase();
        assert_eq!(
            t.verify(Some(upper.as_bytes()), b).err(),
            Some(SignatureError::NotLowerHex)
        );
    }

    #[test]
    fn token_lists_refuse_empty() {
        assert_eq!(
            ManagementTokens::from_csv("").err(),
            Some(TokensError::None)
        );
        assert_eq!(
            ManagementTokens::from_csv("a,,b").err(),
            Some(TokensError::EmptyToken(1))
        );
        assert_eq!(ManagementTokens::from_csv("a, b").map(|t| t.len()), Ok(2));
        assert!(!format!("{:?}", tokens(&["secret-value"])).contains("secret-value"));
    }
}
