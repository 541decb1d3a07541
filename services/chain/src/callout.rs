//! NATS auth callout claims (nats-server 2.10+, ADR-26), server-config mode: the server
//! sends an authorization request JWT (signed by the server's key) on
//! `$SYS.REQ.USER.AUTH` for each connection not among its `auth_users`; the answer is an
//! authorization response JWT, signed by the callout's issuer account key, carrying a
//! user JWT for the connection's server-made user key with that user's permissions, or
//! an error. The codec only: what to grant is the service's decision.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::json;

/// Where nats-server asks.
pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// The account every user lands in, in server-config mode without accounts.
pub const GLOBAL_ACCOUNT: &str = "$G";
const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

#[derive(Debug, thiserror::Error)]
pub enum CalloutError {
    #[error("not a JWT")]
    Shape,
    #[error("its claims are not readable: {0}")]
    Claims(String),
    #[error("not signed by its issuer {0}")]
    Signature(String),
    #[error("not an authorization request (aud {0:?})")]
    NotARequest(String),
}

/// What a connecting client presented, as the server reports it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConnectOptions {
    #[serde(default)]
    pub auth_token: Option<String>,
    #[serde(default)]
    pub nkey: Option<String>,
    /// The client's signature of the server's nonce (base64url), when it sent one.
    #[serde(default)]
    pub sig: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClientInfo {
    /// The nonce the server sent this client (present when the client signed one).
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct ServerId {
    id: String,
}

#[derive(Clone, Debug, Deserialize)]
struct RequestBody {
    user_nkey: String,
    server_id: ServerId,
    #[serde(default)]
    connect_opts: ConnectOptions,
    #[serde(default)]
    client_info: ClientInfo,
}

#[derive(Clone, Debug, Deserialize)]
struct RequestClaims {
    iss: String,
    aud: String,
    nats: RequestBody,
}

/// One connection asking to be let in.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    /// The user key the server made for this connection: the subject of any answer.
    pub user_nkey: String,
    /// The server asking: the audience of the answer.
    pub server_id: String,
    pub connect: ConnectOptions,
    pub client: ClientInfo,
}

impl AuthRequest {
    /// Reads a request JWT and checks that its issuer (the server) signed it.
    pub fn decode(jwt: &str) -> Result<AuthRequest, CalloutError> {
        let (claims, issuer) = decode_signed::<RequestClaims>(jwt)?;
        if claims.aud != "nats-authorization-request" {
            return Err(CalloutError::NotARequest(claims.aud));
        }
        debug_assert_eq!(issuer, claims.iss);
        let b = claims.nats;
        Ok(AuthRequest {
            user_nkey: b.user_nkey,
            server_id: b.server_id.id,
            connect: b.connect_opts,
            client: b.client_info,
        })
    }

    /// Whether the client signed the server's nonce with the NKey it named: a configured
    /// user (a tenant, a miner keyed by hand) proves itself this way.
    pub fn nkey_signed(&self) -> Option<&str> {
        let (nkey, sig, nonce) =
            (self.connect.nkey.as_deref()?, self.connect.sig.as_deref()?, self.client.nonce.as_deref()?);
        let sig = URL_SAFE_NO_PAD.decode(sig).or_else(|_| STANDARD.decode(sig)).ok()?;
        let key = nkeys::KeyPair::from_public_key(nkey).ok()?;
        key.verify(nonce.as_bytes(), &sig).ok()?;
        Some(nkey)
    }
}

/// What a user may do, as the user JWT carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May publish to the reply subject of a message it received (once, as NATS'
    /// `allow_responses`).
    pub allow_responses: bool,
    /// When the user expires (Unix seconds): the server closes the connection then and the
    /// client must prove itself again to reconnect.
    pub expires_s: u64,
}

/// The callout's answers, signed by its issuer account key.
pub struct Issuer {
    key: nkeys::KeyPair,
}

impl Issuer {
    /// From the issuer account's seed (`SA…`).
    pub fn from_seed(seed: &str) -> Result<Issuer, nkeys::error::Error> {
        Ok(Issuer { key: nkeys::KeyPair::from_seed(seed.trim())? })
    }

    /// A new issuer account key: its seed, to keep, and its public key, for the server's
    /// `auth_callout { issuer }`.
    pub fn generate() -> (String, String) {
        let key = nkeys::KeyPair::new_account();
        (key.seed().expect("a generated key has its seed"), key.public_key())
    }

    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// Lets the connection in with `grant`.
    pub fn allow(&self, request: &AuthRequest, grant: &Grant, now_s: u64) -> String {
        let mut nats = json!({
            "pub": { "allow": grant.publish },
            "sub": { "allow": grant.subscribe },
            "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        });
        if grant.allow_responses {
            nats["resp"] = json!({ "max": 1, "ttl": 0 });
        }
        let user = self.sign(json!({
            "jti": jti(),
            "iat": now_s,
            "exp": grant.expires_s,
            "iss": self.public_key(),
            "name": grant.name,
            "sub": request.user_nkey,
            "aud": GLOBAL_ACCOUNT,
            "nats": nats,
        }));
        self.respond(request, json!({ "jwt": user, "type": "authorization_response", "version": 2 }), now_s)
    }

    /// Refuses the connection; the server logs `reason`.
    pub fn deny(&self, request: &AuthRequest, reason: &str, now_s: u64) -> String {
        self.respond(request, json!({ "error": reason, "type": "authorization_response", "version": 2 }), now_s)
    }

    fn respond(&self, request: &AuthRequest, nats: serde_json::Value, now_s: u64) -> String {
        self.sign(json!({
            "jti": jti(),
            "iat": now_s,
            "iss": self.public_key(),
            "sub": request.user_nkey,
            "aud": request.server_id,
            "nats": nats,
        }))
    }

    fn sign(&self, claims: serde_json::Value) -> String {
        let signing_input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(HEADER), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self.key.sign(signing_input.as_bytes()).expect("an issuer has its seed");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

fn jti() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// A JWT's claims, when its `iss` signed it; with that issuer.
fn decode_signed<T: serde::de::DeserializeOwned>(jwt: &str) -> Result<(T, String), CalloutError> {
    let parts: Vec<&str> = jwt.trim().split('.').collect();
    let [header, claims, signature] = parts[..] else { return Err(CalloutError::Shape) };
    let raw = URL_SAFE_NO_PAD.decode(claims).map_err(|_| CalloutError::Shape)?;
    let value: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| CalloutError::Claims(e.to_string()))?;
    let issuer = value["iss"].as_str().ok_or_else(|| CalloutError::Claims("no iss".into()))?.to_string();
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| CalloutError::Shape)?;
    let key = nkeys::KeyPair::from_public_key(&issuer).map_err(|_| CalloutError::Signature(issuer.clone()))?;
    key.verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|_| CalloutError::Signature(issuer.clone()))?;
    let claims = serde_json::from_value(value).map_err(|e| CalloutError::Claims(e.to_string()))?;
    Ok((claims, issuer))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as nats-server writes one, signed by a server key.
    fn request(server: &nkeys::KeyPair, user: &str, opts: serde_json::Value) -> String {
        let claims = json!({
            "aud": "nats-authorization-request", "iss": server.public_key(), "sub": "A", "iat": 1, "jti": "x",
            "nats": {
                "user_nkey": user, "server_id": { "id": server.public_key(), "name": "n" },
                "connect_opts": opts, "client_info": { "nonce": "abc", "host": "127.0.0.1" },
                "type": "authorization_request", "version": 2,
            },
        });
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(HEADER), URL_SAFE_NO_PAD.encode(claims.to_string()));
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(server.sign(input.as_bytes()).unwrap()))
    }

    #[test]
    fn requests_are_read_and_answers_name_the_connection_and_server() {
        let server = nkeys::KeyPair::new_server();
        let user = nkeys::KeyPair::new_user().public_key();
        let jwt = request(&server, &user, json!({ "auth_token": "t" }));
        let req = AuthRequest::decode(&jwt).unwrap();
        assert_eq!(req.user_nkey, user);
        assert_eq!(req.connect.auth_token.as_deref(), Some("t"));
        assert_eq!(req.client.nonce.as_deref(), Some("abc"));
        // A request whose claims were changed after signing is refused.
        let mut parts: Vec<String> = jwt.split('.').map(str::to_string).collect();
        parts[1] = URL_SAFE_NO_PAD
            .encode(String::from_utf8(URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap().replace("\"t\"", "\"u\""));
        assert!(matches!(AuthRequest::decode(&parts.join(".")), Err(CalloutError::Signature(_))));

        let (seed, public) = Issuer::generate();
        let issuer = Issuer::from_seed(&seed).unwrap();
        let grant = Grant {
            name: "m".into(),
            publish: vec!["a".into()],
            subscribe: vec![],
            allow_responses: true,
            expires_s: 99,
        };
        let answer = issuer.allow(&req, &grant, 10);
        let (claims, iss) = decode_signed::<serde_json::Value>(&answer).unwrap();
        assert_eq!(iss, public);
        assert_eq!(claims["sub"], user.as_str());
        assert_eq!(claims["aud"], server.public_key().as_str());
        let (user_claims, _) = decode_signed::<serde_json::Value>(claims["nats"]["jwt"].as_str().unwrap()).unwrap();
        assert_eq!(user_claims["sub"], user.as_str());
        assert_eq!(user_claims["nats"]["pub"]["allow"][0], "a");
        assert_eq!(user_claims["exp"], 99);
    }

    #[test]
    fn a_configured_users_nonce_signature_is_checked() {
        let server = nkeys::KeyPair::new_server();
        let tenant = nkeys::KeyPair::new_user();
        let sig = URL_SAFE_NO_PAD.encode(tenant.sign(b"abc").unwrap());
        let jwt = request(&server, "U", json!({ "nkey": tenant.public_key(), "sig": sig }));
        assert_eq!(AuthRequest::decode(&jwt).unwrap().nkey_signed(), Some(tenant.public_key().as_str()));
        let other = URL_SAFE_NO_PAD.encode(tenant.sign(b"abd").unwrap());
        let jwt = request(&server, "U", json!({ "nkey": tenant.public_key(), "sig": other }));
        assert_eq!(AuthRequest::decode(&jwt).unwrap().nkey_signed(), None);
    }
}
