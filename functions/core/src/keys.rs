//! Blob key layout and S3 event key decoding (one place for both).
//!
//! Uploads land under `uploads/{tenant}/{imageId}.{ext}`; resized JPEGs go to
//! `resized/{tenant}/{imageId}/{sha256}.jpg`, never under the triggering prefix. The resized key
//! names its content, so a later upload can never change what an earlier job reads.

pub const UPLOAD_PREFIX: &str = "uploads/";
pub const RESIZED_PREFIX: &str = "resized/";

/// Why an S3 event key cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyDecodeError {
    /// The `%XX` escapes spell bytes that are not UTF-8 (S3 keys are UTF-8).
    #[error("S3 key {raw:?} does not decode to UTF-8")]
    NotUtf8 { raw: String },
}

/// Decode an S3 event notification key: form-urlencoded, so `+` is a space, then `%XX`.
/// Invalid escapes are kept literally; invalid UTF-8 is an error.
pub fn decode_s3_event_key(raw: &str) -> Result<String, KeyDecodeError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| KeyDecodeError::NotUtf8 {
        raw: raw.to_string(),
    })
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Tenant and image id from an upload key `uploads/{tenant}/{imageId}.{ext}`.
/// Other layouts under the prefix (drops by other systems) get the tenant `default` and an
/// id derived from the rest of the key, so nothing is silently ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadKey {
    pub tenant: String,
    pub image_id: String,
}

pub fn parse_upload_key(key: &str, prefix: &str) -> Option<UploadKey> {
    let rest = key.strip_prefix(prefix)?;
    if rest.is_empty() || rest.ends_with('/') {
        return None;
    }
    let (tenant, file) = match rest.split_once('/') {
        Some((t, f)) if !t.is_empty() && !f.contains('/') => (t.to_string(), f.to_string()),
        _ => ("default".to_string(), rest.to_string()),
    };
    let stem = match file.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s.to_string(),
        _ => file,
    };
    let mut image_id = sanitize_id(&stem);
    if image_id != stem {
        // Keep ids unique when sanitising maps different keys to the same text.
        use sha2::{Digest, Sha256};
        let h = hex::encode(Sha256::digest(key.as_bytes()));
        image_id = format!("{}-{}", image_id, &h[..10]);
    }
    Some(UploadKey { tenant, image_id })
}

/// Make a string safe as an id in keys and URLs: keep [A-Za-z0-9._-], replace the rest.
pub fn sanitize_id(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(128);
    out
}

pub fn upload_key(tenant: &str, image_id: &str, ext: &str) -> String {
    format!("{UPLOAD_PREFIX}{tenant}/{image_id}.{ext}")
}

/// Content-addressed key of a resized JPEG (`sha256` = hex digest of its bytes).
pub fn resized_key(tenant: &str, image_id: &str, sha256: &str) -> String {
    format!("{RESIZED_PREFIX}{tenant}/{image_id}/{sha256}.jpg")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_form_urlencoded_keys() {
        // `a b+c(1)/é.jpg` as S3 sends it.
        assert_eq!(
            decode_s3_event_key("a+b%2Bc%281%29/%C3%A9.jpg").unwrap(),
            "a b+c(1)/é.jpg"
        );
        assert_eq!(
            decode_s3_event_key("uploads%2Ft%2Fx.jpg").unwrap(),
            "uploads/t/x.jpg"
        );
        assert_eq!(decode_s3_event_key("100%").unwrap(), "100%");
        assert_eq!(decode_s3_event_key("%zz").unwrap(), "%zz");
        assert_eq!(decode_s3_event_key("%4").unwrap(), "%4");
        assert_eq!(
            decode_s3_event_key("%FF"),
            Err(KeyDecodeError::NotUtf8 { raw: "%FF".into() })
        );
    }

    #[test]
    fn parses_upload_keys() {
        assert_eq!(
            parse_upload_key("uploads/acme/0191abc.jpg", UPLOAD_PREFIX),
            Some(UploadKey {
                tenant: "acme".into(),
                image_id: "0191abc".into()
            })
        );
        let k = parse_upload_key("uploads/a b+c(1)/é.jpg", UPLOAD_PREFIX).unwrap();
        assert_eq!(k.tenant, "a b+c(1)");
        assert!(
            k.image_id.starts_with("_-") && k.image_id.len() == 12,
            "{}",
            k.image_id
        );
        let k = parse_upload_key("uploads/x/y/z.png", UPLOAD_PREFIX).unwrap();
        assert_eq!(k.tenant, "default");
        assert!(k.image_id.starts_with("x_y_z-"));
        assert_eq!(parse_upload_key("resized/t/x.jpg", UPLOAD_PREFIX), None);
        assert_eq!(parse_upload_key("uploads/", UPLOAD_PREFIX), None);
        assert_eq!(parse_upload_key("uploads/t/", UPLOAD_PREFIX), None);
    }

    #[test]
    fn output_never_under_upload_prefix() {
        let k = resized_key("t", "i", "ab12");
        assert!(!k.starts_with(UPLOAD_PREFIX));
        assert_eq!(k, "resized/t/i/ab12.jpg");
    }
}
