//! A small, lenient PEM reader and a canonical writer.
//!
//! Orchard reads PEM from operators (push certificate bundles, CA files) and from proxies
//! (nginx's escaped client certificate), which disagree about line lengths, trailing
//! newlines and CRLF. Only the armour and the base64 body matter, so that is all this
//! reader looks at.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::IdentityError;

const BEGIN: &str = "-----BEGIN ";
const END: &str = "-----END ";
const DASHES: &str = "-----";

/// One decoded `-----BEGIN <label>-----` … `-----END <label>-----` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PemBlock {
    pub label: String,
    pub der: Vec<u8>,
}

/// Decodes every PEM block in `text`, in order; text between blocks is ignored.
pub(crate) fn decode_blocks(text: &str) -> Result<Vec<PemBlock>, IdentityError> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let after_begin = &rest[start + BEGIN.len()..];
        let label_end = after_begin
            .find(DASHES)
            .ok_or_else(|| IdentityError::BadPem("unterminated BEGIN line".into()))?;
        let label = &after_begin[..label_end];
        let body_and_rest = &after_begin[label_end + DASHES.len()..];
        let end_line = format!("{END}{label}{DASHES}");
        let body_end = body_and_rest
            .find(&end_line)
            .ok_or_else(|| IdentityError::BadPem(format!("missing `{end_line}`")))?;
        blocks.push(PemBlock {
            label: label.to_owned(),
            der: decode_body(label, &body_and_rest[..body_end])?,
        });
        rest = &body_and_rest[body_end + end_line.len()..];
    }
    if blocks.is_empty() {
        return Err(IdentityError::BadPem("no PEM block found".into()));
    }
    Ok(blocks)
}

fn decode_body(label: &str, body: &str) -> Result<Vec<u8>, IdentityError> {
    if body.contains(':') {
        return Err(IdentityError::BadPem(format!(
            "{label} block has headers (an encrypted key?); only unencrypted PEM is supported"
        )));
    }
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(IdentityError::BadPem(format!("{label} block is empty")));
    }
    STANDARD
        .decode(compact)
        .map_err(|err| IdentityError::BadBase64(format!("in {label} block: {err}")))
}

/// Encodes `der` as PEM with 64-character lines, the form every consumer accepts.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = format!("{BEGIN}{label}{DASHES}\n");
    let mut rest = body.as_str();
    while !rest.is_empty() {
        // base64 output is ASCII, so any index is a char boundary.
        let (line, tail) = rest.split_at(rest.len().min(64));
        pem.push_str(line);
        pem.push('\n');
        rest = tail;
    }
    pem.push_str(&format!("{END}{label}{DASHES}\n"));
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_round_trips() {
        let der: Vec<u8> = (0..=255).collect();
        let pem = encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|line| line.len() <= 64));
        let blocks = decode_blocks(&pem).unwrap();
        assert_eq!(
            blocks,
            [PemBlock {
                label: "CERTIFICATE".into(),
                der
            }]
        );
    }

    #[test]
    fn reads_several_blocks_with_crlf_and_surrounding_text() {
        let text = "subject=whatever\r\n-----BEGIN A-----\r\nAQI=\r\n-----END A-----\r\n\
                    junk\n-----BEGIN B KEY-----\nAw==\n-----END B KEY-----";
        let blocks = decode_blocks(text).unwrap();
        assert_eq!(
            blocks[0],
            PemBlock {
                label: "A".into(),
                der: vec![1, 2]
            }
        );
        assert_eq!(
            blocks[1],
            PemBlock {
                label: "B KEY".into(),
                der: vec![3]
            }
        );
    }

    #[test]
    fn rejects_text_without_blocks() {
        let err = decode_blocks("hello").unwrap_err();
        assert_eq!(err.reason(), "bad_pem");
    }

    #[test]
    fn rejects_a_block_without_its_end_line() {
        let err = decode_blocks("-----BEGIN CERTIFICATE-----\nAQI=\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid PEM: missing `-----END CERTIFICATE-----`"
        );
    }

    #[test]
    fn rejects_bad_base64_inside_a_block() {
        let err = decode_blocks("-----BEGIN X-----\n!!!!\n-----END X-----").unwrap_err();
        assert_eq!(err.reason(), "bad_base64");
    }

    #[test]
    fn rejects_encrypted_pem() {
        let text = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nAQI=\n\
                    -----END RSA PRIVATE KEY-----";
        assert_eq!(decode_blocks(text).unwrap_err().reason(), "bad_pem");
    }
}
