//! Signed, expiring download links: HMAC-SHA256 over the job id and the expiry time, with a key
//! given to every replica (so any serves any link) or kept under the data dir (so links outlive
//! a restart).

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
}

impl UrlSigner {
    /// A key given as hex (`--signing-key`); `None` when it is not hex or shorter than 32 bytes.
    pub fn from_hex(hexkey: &str) -> Option<Self> {
        hex::decode(hexkey.trim())
            .ok()
            .filter(|key| key.len() >= 32)
            .map(|key| Self { key })
    }

    /// Loads the key from `path`, creating a random one the first time.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        if let Some(signer) = std::fs::read_to_string(path)
            .ok()
            .and_then(|k| Self::from_hex(&k))
        {
            return Ok(signer);
        }
        let mut key = vec![0u8; 32];
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, hex::encode(&key))?;
        Ok(Self { key })
    }

    pub fn sign(&self, job_id: &str, expires: u64) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{job_id}:{expires}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// True when `signature` is this server's for `job_id` and `expires` is not past `now`.
    pub fn verify(&self, job_id: &str, expires: u64, signature: &str, now: u64) -> bool {
        if expires < now {
            return false;
        }
        let Ok(given) = hex::decode(signature) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{job_id}:{expires}").as_bytes());
        mac.verify_slice(&given).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_job_and_time() {
        let dir = std::env::temp_dir().join(format!("embedd-signer-{}", std::process::id()));
        let signer = UrlSigner::load_or_create(&dir.join("key")).unwrap();
        let sig = signer.sign("job1", 100);
        assert!(signer.verify("job1", 100, &sig, 50));
        assert!(!signer.verify("job1", 100, &sig, 101), "expired");
        assert!(!signer.verify("job2", 100, &sig, 50), "other job");
        assert!(!signer.verify("job1", 200, &sig, 50), "other expiry");
        assert!(!signer.verify("job1", 100, "zz", 50));
        let again = UrlSigner::load_or_create(&dir.join("key")).unwrap();
        assert!(
            again.verify("job1", 100, &sig, 50),
            "the key survives a restart"
        );
        std::fs::remove_dir_all(dir).unwrap();
        let shared = "ab".repeat(32);
        let (a, b) = (
            UrlSigner::from_hex(&shared).unwrap(),
            UrlSigner::from_hex(&shared).unwrap(),
        );
        assert!(
            b.verify("job1", 100, &a.sign("job1", 100), 50),
            "replicas agree"
        );
        assert!(UrlSigner::from_hex("abcd").is_none(), "too short");
        assert!(UrlSigner::from_hex("not hex").is_none());
    }
}
