//! Hotkeys: sr25519 key pairs as Substrate and Bittensor make them, their SS58 addresses,
//! and the files they are kept in (a Bittensor wallet's hotkey file, or a seed file).

use std::path::{Path, PathBuf};

use blake2::{Blake2b512, Digest};
use schnorrkel::{ExpansionMode, MiniSecretKey, SecretKey};

/// The context Substrate signs sr25519 messages under (`sp_core::sr25519`).
const SIGNING_CONTEXT: &[u8] = b"substrate";
/// The SS58 address format Bittensor uses (the generic Substrate one).
pub const SS58_FORMAT: u8 = 42;
/// The seed of Substrate's well-known development phrase ("bottom drive obey lake curtain
/// smoke basket hold race lonely fit walk"): `//Alice`, `//Bob`, ... derive from it. For
/// tests and local stacks only: every such key is public.
const DEV_PHRASE_SEED: [u8; 32] = hex_literal("fac7959dbfe72f052e5a0c3c8d6530f202b02fd8f9f5ca3580ec8deb7797479e");

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not an SS58 address: {1}")]
    Address(String, &'static str),
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("not an sr25519 key: {0}")]
    Key(String),
}

/// An account's public key and its SS58 address (a hotkey or a coldkey).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub [u8; 32]);

impl AccountId {
    /// Its SS58 address (format 42: `5…`).
    pub fn to_ss58(&self) -> String {
        let mut bytes = vec![SS58_FORMAT];
        bytes.extend_from_slice(&self.0);
        let checksum = ss58_checksum(&bytes);
        bytes.extend_from_slice(&checksum[..2]);
        bs58::encode(bytes).into_string()
    }

    /// Reads an SS58 address of format 42, checksum checked.
    pub fn from_ss58(address: &str) -> Result<AccountId, KeyError> {
        let bad = |why| KeyError::Address(address.to_string(), why);
        let bytes = bs58::decode(address).into_vec().map_err(|_| bad("not base58"))?;
        if bytes.len() != 35 {
            return Err(bad("not 35 bytes (a one-byte format, a 32-byte key, a two-byte checksum)"));
        }
        if bytes[0] != SS58_FORMAT {
            return Err(bad("not address format 42"));
        }
        if ss58_checksum(&bytes[..33])[..2] != bytes[33..] {
            return Err(bad("its checksum does not match"));
        }
        Ok(AccountId(bytes[1..33].try_into().expect("32 bytes")))
    }

    /// `0x` and the key in hex, as wallet files and the chain write it.
    pub fn to_hex(&self) -> String {
        format!("0x{}", hex::encode(self.0))
    }

    /// Whether `signature` is this account's sr25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        let (Ok(public), Ok(signature)) =
            (schnorrkel::PublicKey::from_bytes(&self.0), schnorrkel::Signature::from_bytes(signature))
        else {
            return false;
        };
        public.verify_simple(SIGNING_CONTEXT, message, &signature).is_ok()
    }
}

impl std::fmt::Display for AccountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_ss58())
    }
}

impl std::fmt::Debug for AccountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccountId({})", self.to_ss58())
    }
}

fn ss58_checksum(bytes: &[u8]) -> [u8; 64] {
    let mut hasher = Blake2b512::new();
    hasher.update(b"SS58PRE");
    hasher.update(bytes);
    hasher.finalize().into()
}

/// A hotkey's key pair: signs as its account.
pub struct Hotkey {
    pair: schnorrkel::Keypair,
    pub account: AccountId,
}

impl std::fmt::Debug for Hotkey {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hotkey").field("account", &self.account).finish_non_exhaustive()
    }
}

impl Hotkey {
    /// The key pair of a 32-byte seed (a "mini secret"), expanded as Substrate does.
    pub fn from_seed(seed: &[u8]) -> Result<Hotkey, KeyError> {
        let mini = MiniSecretKey::from_bytes(seed).map_err(|e| KeyError::Key(e.to_string()))?;
        Ok(Hotkey::of(mini.expand_to_keypair(ExpansionMode::Ed25519)))
    }

    /// A development key: `//Name` (hard derivations, as Substrate's `//Alice`) of the
    /// well-known development phrase. Public to everyone: for tests and local stacks.
    pub fn dev(uri: &str) -> Result<Hotkey, KeyError> {
        let junctions: Vec<&str> = uri.strip_prefix("//").map(|rest| rest.split("//").collect()).unwrap_or_default();
        if junctions.is_empty() || junctions.iter().any(|j| j.is_empty() || j.contains('/')) {
            return Err(KeyError::Key(format!("{uri:?} is not a development key (//Name, hard junctions only)")));
        }
        let mut secret: SecretKey =
            MiniSecretKey::from_bytes(&DEV_PHRASE_SEED).expect("32 bytes").expand(ExpansionMode::Ed25519);
        for junction in junctions {
            let (mini, _) =
                secret.hard_derive_mini_secret_key(Some(schnorrkel::derive::ChainCode(chain_code(junction))), b"");
            secret = mini.expand(ExpansionMode::Ed25519);
        }
        Ok(Hotkey::of(secret.to_keypair()))
    }

    fn of(pair: schnorrkel::Keypair) -> Hotkey {
        let account = AccountId(pair.public.to_bytes());
        Hotkey { pair, account }
    }

    /// Reads a hotkey from a file: a Bittensor wallet's hotkey file (JSON with `secretSeed`
    /// or `privateKey`, checked against its `publicKey`), or a text file holding a `0x`
    /// hex seed or a development key (`//Alice`).
    pub fn load(path: &Path) -> Result<Hotkey, KeyError> {
        let fail = |reason: String| KeyError::File { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let text = text.trim();
        if text.starts_with('{') {
            return wallet_hotkey(text).map_err(fail);
        }
        if text.starts_with("//") {
            return Hotkey::dev(text).map_err(|e| fail(e.to_string()));
        }
        let seed = decode_hex(text).ok_or_else(|| fail("neither wallet JSON, a 0x hex seed nor //Name".into()))?;
        Hotkey::from_seed(&seed).map_err(|e| fail(e.to_string()))
    }

    /// The hotkey file of a Bittensor wallet: `<wallets>/<name>/hotkeys/<hotkey>`.
    pub fn wallet_path(wallets: &Path, name: &str, hotkey: &str) -> PathBuf {
        wallets.join(name).join("hotkeys").join(hotkey)
    }

    /// Signs `message` (sr25519, context `substrate`): 64 bytes.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.pair.sign_simple(SIGNING_CONTEXT, message).to_bytes()
    }

    /// A Bittensor wallet's hotkey file for this key (with its seed when given): what
    /// `btcli wallet new_hotkey` writes, for tests and `sundara chain keygen`.
    pub fn wallet_json(&self, seed: Option<&[u8; 32]>) -> String {
        let mut file = serde_json::json!({
            "accountId": self.account.to_hex(),
            "publicKey": self.account.to_hex(),
            "privateKey": format!("0x{}", hex::encode(self.pair.secret.to_ed25519_bytes())),
            "ss58Address": self.account.to_ss58(),
        });
        if let Some(seed) = seed {
            file["secretSeed"] = format!("0x{}", hex::encode(seed)).into();
        }
        file.to_string()
    }
}

/// A hard junction's chain code: its SCALE encoding (a compact length, then the bytes),
/// zero-padded to 32 bytes, or its blake2b-256 when longer (Substrate's `DeriveJunction`).
fn chain_code(junction: &str) -> [u8; 32] {
    let mut encoded = Vec::new();
    if let Ok(n) = junction.parse::<u64>() {
        encoded.extend_from_slice(&n.to_le_bytes());
    } else {
        let len = junction.len();
        assert!(len < 1 << 14, "junction too long");
        if len < 64 {
            encoded.push((len as u8) << 2);
        } else {
            encoded.extend_from_slice(&(((len as u16) << 2) | 1).to_le_bytes());
        }
        encoded.extend_from_slice(junction.as_bytes());
    }
    let mut code = [0u8; 32];
    if encoded.len() > 32 {
        let mut hasher = blake2::Blake2b::<blake2::digest::consts::U32>::new();
        hasher.update(&encoded);
        code.copy_from_slice(&hasher.finalize());
    } else {
        code[..encoded.len()].copy_from_slice(&encoded);
    }
    code
}

fn wallet_hotkey(text: &str) -> Result<Hotkey, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct WalletFile {
        public_key: Option<String>,
        secret_seed: Option<String>,
        private_key: Option<String>,
    }
    let file: WalletFile = serde_json::from_str(text)
        .map_err(|e| format!("not a wallet hotkey file ({e}); is it encrypted? hotkeys are kept in clear"))?;
    let hotkey = if let Some(seed) = file.secret_seed.as_deref().and_then(decode_hex) {
        Hotkey::from_seed(&seed).map_err(|e| e.to_string())?
    } else if let Some(private) = file.private_key.as_deref().and_then(decode_hex) {
        let secret = SecretKey::from_ed25519_bytes(&private).map_err(|e| e.to_string())?;
        Hotkey::of(secret.to_keypair())
    } else {
        return Err("it holds neither secretSeed nor privateKey".into());
    };
    if let Some(public) = file.public_key.as_deref().and_then(decode_hex)
        && public != hotkey.account.0
    {
        return Err(format!("its key pair is not its publicKey ({})", file.public_key.unwrap_or_default()));
    }
    Ok(hotkey)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    hex::decode(text.trim().strip_prefix("0x").unwrap_or(text.trim())).ok()
}

const fn hex_literal(text: &str) -> [u8; 32] {
    let bytes = text.as_bytes();
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = (nibble(bytes[2 * i]) << 4) | nibble(bytes[2 * i + 1]);
        i += 1;
    }
    out
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not lowercase hex"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Substrate's published development accounts (`subkey inspect //Alice`, ...): the
    /// derivation, the expansion and SS58 all agree with the chain's own tooling.
    #[test]
    fn development_keys_match_substrate() {
        let cases = [
            (
                "//Alice",
                "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d",
                "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
            ),
            (
                "//Bob",
                "8eaf04151687736326c9fea17e25fc5287613693c912909cb226aa4794f26a48",
                "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
            ),
        ];
        for (uri, public, ss58) in cases {
            let key = Hotkey::dev(uri).unwrap();
            assert_eq!(hex::encode(key.account.0), public, "{uri}");
            assert_eq!(key.account.to_ss58(), ss58, "{uri}");
            assert_eq!(AccountId::from_ss58(ss58).unwrap(), key.account);
        }
        // The phrase's own key, underived.
        let root = Hotkey::from_seed(&DEV_PHRASE_SEED).unwrap();
        assert_eq!(root.account.to_ss58(), "5DfhGyQdFobKM8NsWvEeAKk5EQQgYe9AydgJ7rMB6E1EqRzV");
    }

    #[test]
    fn a_mistyped_address_is_refused() {
        let alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
        let typo = alice.replace('Y', "Z");
        assert!(matches!(AccountId::from_ss58(&typo), Err(KeyError::Address(_, _))));
        assert!(AccountId::from_ss58("not base58 0OIl").is_err());
    }

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let alice = Hotkey::dev("//Alice").unwrap();
        let bob = Hotkey::dev("//Bob").unwrap();
        let sig = alice.sign(b"hello");
        assert!(alice.account.verifies(b"hello", &sig));
        assert!(!alice.account.verifies(b"hellO", &sig));
        assert!(!bob.account.verifies(b"hello", &sig));
        assert!(!alice.account.verifies(b"hello", &sig[..63]));
    }

    #[test]
    fn wallet_files_and_seed_files_load() {
        let dir = tempfile::tempdir().unwrap();
        let seed = [7u8; 32];
        let key = Hotkey::from_seed(&seed).unwrap();
        let path = Hotkey::wallet_path(dir.path(), "miner", "default");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, key.wallet_json(Some(&seed))).unwrap();
        assert_eq!(Hotkey::load(&path).unwrap().account, key.account);
        // Without the seed: the 64-byte private key, as older wallets keep it.
        std::fs::write(&path, key.wallet_json(None)).unwrap();
        assert_eq!(Hotkey::load(&path).unwrap().account, key.account);
        // A public key that is not the pair's is refused.
        let other = Hotkey::dev("//Bob").unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&key.wallet_json(Some(&seed))).unwrap();
        json["publicKey"] = other.account.to_hex().into();
        std::fs::write(&path, json.to_string()).unwrap();
        assert!(Hotkey::load(&path).unwrap_err().to_string().contains("not its publicKey"));
        let seed_file = dir.path().join("seed");
        std::fs::write(&seed_file, format!("0x{}\n", hex::encode(seed))).unwrap();
        assert_eq!(Hotkey::load(&seed_file).unwrap().account, key.account);
        std::fs::write(&seed_file, "//Alice\n").unwrap();
        assert_eq!(Hotkey::load(&seed_file).unwrap().account, Hotkey::dev("//Alice").unwrap().account);
        assert!(format!("{:?}", Hotkey::load(&seed_file).unwrap()).contains("5Grwva"));
    }
}
