//! btauth/1: a request signed by the sender's hotkey (sr25519), as Bittensor 11's
//! `bittensor.http_auth` signs HTTP between validators and miners. The signed payload is
//! these lines joined by `\n`: `btauth/1`, the scheme (`sr25519`), the method in capitals,
//! the target (path and query), the body's SHA-256 in hex, the nonce (Unix nanoseconds),
//! the sender's and the receiver's SS58 addresses. It travels in five headers
//! (`X-Bittensor-Version: 1`, `-Hotkey`, `-Receiver`, `-Nonce`, `-Signature` as `0x` and
//! 128 hex digits).
//!
//! A verifier accepts a request only for its own receiver, with a nonce inside its freshness
//! window, signed by the named hotkey; the caller then refuses a (sender, nonce) it has
//! seen within the window (a replay store), so one signed request is good once.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::keys::{AccountId, Hotkey};

pub const VERSION_HEADER: &str = "X-Bittensor-Version";
pub const HOTKEY_HEADER: &str = "X-Bittensor-Hotkey";
pub const RECEIVER_HEADER: &str = "X-Bittensor-Receiver";
pub const NONCE_HEADER: &str = "X-Bittensor-Nonce";
pub const SIGNATURE_HEADER: &str = "X-Bittensor-Signature";
/// How old a nonce may be, and how far ahead of the verifier's clock (clock skew).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_AHEAD: Duration = Duration::from_secs(2);

/// Why a signed request was refused: the sender learns the kind, never more.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BtAuthError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("unsupported btauth version {0:?} (1 is)")]
    Version(String),
    #[error("signed for receiver {got}, not this one ({expected})")]
    WrongReceiver { expected: String, got: String },
    #[error("{0} is malformed")]
    Malformed(&'static str),
    #[error("the nonce is {age_ms} ms old (at most {max_ms} ms)")]
    Stale { age_ms: u64, max_ms: u64 },
    #[error("the nonce is {ahead_ms} ms ahead of this clock (at most {max_ms} ms)")]
    Ahead { ahead_ms: u64, max_ms: u64 },
    #[error("the signature is not the sender's")]
    BadSignature,
    #[error("this request was seen before (a replay)")]
    Replayed,
}

/// The bytes a btauth/1 signature covers.
pub fn payload(method: &str, target: &str, body: &[u8], nonce_ns: u64, sender: &str, receiver: &str) -> Vec<u8> {
    let digest = hex::encode(Sha256::digest(body));
    ["btauth/1", "sr25519", &method.to_ascii_uppercase(), target, &digest, &nonce_ns.to_string(), sender, receiver]
        .join("\n")
        .into_bytes()
}

/// A request's btauth/1 headers, as (name, value) pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub hotkey: String,
    pub receiver: String,
    pub nonce_ns: u64,
    pub signature: [u8; 64],
}

impl Signed {
    /// Signs a request from `hotkey` to `receiver` with the nonce `nonce_ns` (now, in Unix
    /// nanoseconds, unless a test says otherwise).
    pub fn sign(hotkey: &Hotkey, receiver: &str, method: &str, target: &str, body: &[u8], nonce_ns: u64) -> Signed {
        let sender = hotkey.account.to_ss58();
        let signature = hotkey.sign(&payload(method, target, body, nonce_ns, &sender, receiver));
        Signed { hotkey: sender, receiver: receiver.to_string(), nonce_ns, signature }
    }

    pub fn headers(&self) -> [(&'static str, String); 5] {
        [
            (VERSION_HEADER, "1".into()),
            (HOTKEY_HEADER, self.hotkey.clone()),
            (RECEIVER_HEADER, self.receiver.clone()),
            (NONCE_HEADER, self.nonce_ns.to_string()),
            (SIGNATURE_HEADER, format!("0x{}", hex::encode(self.signature))),
        ]
    }

    /// Reads the headers through `get` (by name, case as the caller's map treats it).
    pub fn from_headers<'a>(get: impl Fn(&'static str) -> Option<&'a str>) -> Result<Signed, BtAuthError> {
        let header = |name| get(name).ok_or(BtAuthError::Missing(name));
        let version = header(VERSION_HEADER)?;
        if version != "1" {
            return Err(BtAuthError::Version(version.to_string()));
        }
        let nonce = header(NONCE_HEADER)?;
        if nonce.is_empty() || nonce.len() > 20 || !nonce.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BtAuthError::Malformed(NONCE_HEADER));
        }
        let signature = header(SIGNATURE_HEADER)?
            .strip_prefix("0x")
            .filter(|s| s.len() == 128)
            .and_then(|s| hex::decode(s).ok())
            .ok_or(BtAuthError::Malformed(SIGNATURE_HEADER))?;
        Ok(Signed {
            hotkey: header(HOTKEY_HEADER)?.to_string(),
            receiver: header(RECEIVER_HEADER)?.to_string(),
            nonce_ns: nonce.parse().map_err(|_| BtAuthError::Malformed(NONCE_HEADER))?,
            signature: signature.try_into().expect("64 bytes"),
        })
    }

    /// The compact form one string carries (a NATS connect token):
    /// `btauth/1;<hotkey>;<receiver>;<nonce>;0x<signature>`.
    pub fn to_token(&self) -> String {
        format!("btauth/1;{};{};{};0x{}", self.hotkey, self.receiver, self.nonce_ns, hex::encode(self.signature))
    }

    pub fn from_token(token: &str) -> Result<Signed, BtAuthError> {
        let parts: Vec<&str> = token.split(';').collect();
        let [scheme, hotkey, receiver, nonce, signature] = parts[..] else {
            return Err(BtAuthError::Malformed("token"));
        };
        if scheme != "btauth/1" {
            return Err(BtAuthError::Version(scheme.to_string()));
        }
        Signed::from_headers(|name| match name {
            VERSION_HEADER => Some("1"),
            HOTKEY_HEADER => Some(hotkey),
            RECEIVER_HEADER => Some(receiver),
            NONCE_HEADER => Some(nonce),
            SIGNATURE_HEADER => Some(signature),
            _ => None,
        })
    }
}

/// Checks signed requests addressed to one receiver.
#[derive(Clone, Debug)]
pub struct Verifier {
    /// Our own hotkey's SS58 address: a request signed for anyone else is refused.
    pub receiver: String,
    pub max_age: Duration,
    pub max_ahead: Duration,
}

impl Verifier {
    pub fn new(receiver: &str) -> Verifier {
        Verifier { receiver: receiver.to_string(), max_age: DEFAULT_MAX_AGE, max_ahead: DEFAULT_MAX_AHEAD }
    }

    /// The sender of `signed`, a request `method target` with `body`, when it is addressed
    /// here, fresh at `now_ns` and signed by its sender. The caller still refuses replays
    /// (a (sender, nonce) seen within `max_age + max_ahead`).
    pub fn verify(
        &self,
        signed: &Signed,
        method: &str,
        target: &str,
        body: &[u8],
        now_ns: u64,
    ) -> Result<AccountId, BtAuthError> {
        if signed.receiver != self.receiver {
            return Err(BtAuthError::WrongReceiver { expected: self.receiver.clone(), got: signed.receiver.clone() });
        }
        let (max_ms, ahead_max_ms) = (self.max_age.as_millis() as u64, self.max_ahead.as_millis() as u64);
        if signed.nonce_ns < now_ns {
            let age_ms = (now_ns - signed.nonce_ns) / 1_000_000;
            if age_ms > max_ms {
                return Err(BtAuthError::Stale { age_ms, max_ms });
            }
        } else {
            let ahead_ms = (signed.nonce_ns - now_ns) / 1_000_000;
            if ahead_ms > ahead_max_ms {
                return Err(BtAuthError::Ahead { ahead_ms, max_ms: ahead_max_ms });
            }
        }
        let sender = AccountId::from_ss58(&signed.hotkey).map_err(|_| BtAuthError::Malformed(HOTKEY_HEADER))?;
        let message = payload(method, target, body, signed.nonce_ns, &signed.hotkey, &signed.receiver);
        if !sender.verifies(&message, &signed.signature) {
            return Err(BtAuthError::BadSignature);
        }
        Ok(sender)
    }

    /// How long a (sender, nonce) must be remembered to refuse its replays.
    pub fn replay_window(&self) -> Duration {
        self.max_age + self.max_ahead
    }
}

/// Now, in Unix nanoseconds: a btauth nonce.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_780_000_000_000_000_000;
    const PINNED_HEX: &str = "38d928caca77ea76cb5eea6c9378c86f864c0e13278250d785ad2b53e1b42e70c0d7fb7118be17db4623836bad7c03d22881c9fafb6308cd3a77a2c00dc80c88";

    fn alice() -> Hotkey {
        Hotkey::dev("//Alice").unwrap()
    }
    fn bob_ss58() -> String {
        Hotkey::dev("//Bob").unwrap().account.to_ss58()
    }

    /// The canonical payload, byte for byte (the body digest is SHA-256 of `{"a":1}`).
    #[test]
    fn the_payload_is_the_canonical_lines() {
        let p = payload("post", "/v1/x?y=1", br#"{"a":1}"#, 42, "SENDER", "RECEIVER");
        assert_eq!(
            String::from_utf8(p).unwrap(),
            "btauth/1\nsr25519\nPOST\n/v1/x?y=1\n015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862\n42\nSENDER\nRECEIVER"
        );
    }

    /// A pinned vector: `//Alice`'s signature of one request to `//Bob`, made once and kept
    /// (sr25519 signatures are randomised, so a vector is one that must keep verifying).
    /// The btauth/1 spec's own vectors are not reachable from this machine; these keys are
    /// Substrate's development accounts, so any sr25519 implementation can check it.
    #[test]
    fn a_pinned_signature_verifies() {
        let v = Verifier::new(&bob_ss58());
        let s = Signed {
            hotkey: alice().account.to_ss58(),
            receiver: bob_ss58(),
            nonce_ns: NOW,
            signature: hex::decode(PINNED_HEX).unwrap().try_into().unwrap(),
        };
        assert_eq!(v.verify(&s, "POST", "/v1/miners/join", b"body", NOW).unwrap(), alice().account);
        assert_eq!(v.verify(&s, "POST", "/v1/miners/join", b"bodY", NOW), Err(BtAuthError::BadSignature));
    }

    #[test]
    fn a_request_signed_and_verified_round_trips() {
        let v = Verifier::new(&bob_ss58());
        let s = Signed::sign(&alice(), &bob_ss58(), "POST", "/v1/miners/join", b"body", NOW);
        assert_eq!(v.verify(&s, "POST", "/v1/miners/join", b"body", NOW + 1_000_000).unwrap(), alice().account);
        let headers = s.headers();
        let parsed = Signed::from_headers(|n| headers.iter().find(|(h, _)| *h == n).map(|(_, v)| v.as_str())).unwrap();
        assert_eq!(parsed, s);
        assert_eq!(Signed::from_token(&s.to_token()).unwrap(), s);
    }

    #[test]
    fn forged_stale_future_and_misaddressed_requests_are_refused() {
        let v = Verifier::new(&bob_ss58());
        let s = Signed::sign(&alice(), &bob_ss58(), "POST", "/t", b"body", NOW);
        // Another body, method or target: the signature does not cover it.
        assert_eq!(v.verify(&s, "POST", "/t", b"bodY", NOW), Err(BtAuthError::BadSignature));
        assert_eq!(v.verify(&s, "GET", "/t", b"body", NOW), Err(BtAuthError::BadSignature));
        assert_eq!(v.verify(&s, "POST", "/u", b"body", NOW), Err(BtAuthError::BadSignature));
        // Another sender named over Alice's signature.
        let forged = Signed { hotkey: bob_ss58(), ..s.clone() };
        assert_eq!(v.verify(&forged, "POST", "/t", b"body", NOW), Err(BtAuthError::BadSignature));
        // Too old, too far ahead.
        assert!(matches!(v.verify(&s, "POST", "/t", b"body", NOW + 11_000_000_000), Err(BtAuthError::Stale { .. })));
        assert!(matches!(v.verify(&s, "POST", "/t", b"body", NOW - 3_000_000_000), Err(BtAuthError::Ahead { .. })));
        // Signed for another receiver.
        let carol = Verifier::new(&Hotkey::dev("//Charlie").unwrap().account.to_ss58());
        assert!(matches!(carol.verify(&s, "POST", "/t", b"body", NOW), Err(BtAuthError::WrongReceiver { .. })));
        // Malformed headers.
        assert_eq!(Signed::from_token("btauth/1;a;b;12x;0x00"), Err(BtAuthError::Malformed(NONCE_HEADER)));
        assert_eq!(Signed::from_token("btauth/1;a;b;12;0x00"), Err(BtAuthError::Malformed(SIGNATURE_HEADER)));
        assert!(matches!(Signed::from_token("btauth/2;a;b;1;0x"), Err(BtAuthError::Version(_))));
    }
}
