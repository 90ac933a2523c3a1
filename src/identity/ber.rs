//! BER to DER normalisation for CMS messages, and the structural bounds every
//! ASN.1 input from outside is held to before a decoder sees it.
//!
//! Apple devices build `Mdm-Signature` with a streaming CMS encoder that emits BER
//! indefinite lengths (`0x80` … `00 00`). The `der` crate — rightly — refuses those, so
//! signatures are re-encoded with definite, minimal lengths before they are decoded.
//! Segmented (constructed) OCTET STRINGs, which streaming encoders also emit, are joined
//! into one primitive string. Everything else is copied byte for byte: signed attributes
//! and certificates are DER already (RFC 5652 requires it), so the bytes the signature
//! covers are unchanged.

use super::IdentityError;

/// Deeper nesting than any real SignedData; bounds recursion on hostile input.
const MAX_DEPTH: usize = 64;

/// Most elements one constructed element may hold. The `der` crate decodes a SET OF by
/// insertion sort, quadratic in its length: 2,000 reverse-ordered AlgorithmIdentifiers
/// (a 28 KB `Mdm-Signature`) took 13 s to decode. Real signatures, certificates and
/// PKCS#12 files hold a few dozen elements at most in any one SET or SEQUENCE.
pub(crate) const MAX_ELEMENTS: usize = 64;

const INDEFINITE_LENGTH: u8 = 0x80;
const CONSTRUCTED: u8 = 0x20;
const HIGH_TAG_NUMBER: u8 = 0x1f;
const OCTET_STRING: u8 = 0x04;

/// Checks that `input` is one BER (or DER) element within the bounds above, so that
/// decoding it costs time linear in its size.
pub(crate) fn ensure_bounded(input: &[u8]) -> Result<(), IdentityError> {
    // The normalised copy is the walk's by-product; the inputs checked are a few KB.
    normalize(input).map(drop)
}

/// Re-encodes one BER element (and everything inside it) as DER lengths, within the
/// bounds above.
pub(crate) fn normalize(input: &[u8]) -> Result<Vec<u8>, IdentityError> {
    let mut reader = Reader {
        data: input,
        pos: 0,
    };
    let mut out = Vec::with_capacity(input.len());
    reader.copy_element(&mut out, 0)?;
    if reader.pos != input.len() {
        return Err(malformed("trailing bytes after the outer element"));
    }
    Ok(out)
}

fn malformed(what: &str) -> IdentityError {
    IdentityError::BadDer(format!("BER: {what}"))
}

enum Length {
    Definite(usize),
    Indefinite,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, IdentityError> {
        let byte = *self
            .data
            .get(self.pos)
            .ok_or_else(|| malformed("truncated element"))?;
        self.pos += 1;
        Ok(byte)
    }

    fn take(&mut self, len: usize) -> Result<&[u8], IdentityError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.data.len())
            .ok_or_else(|| malformed("length exceeds the available data"))?;
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn at_end_of_contents(&self) -> bool {
        self.data.get(self.pos..self.pos + 2) == Some(&[0, 0])
    }

    /// Reads the identifier octets, returning them and whether the element is constructed.
    fn tag(&mut self) -> Result<(&[u8], bool), IdentityError> {
        let start = self.pos;
        let first = self.byte()?;
        if first & HIGH_TAG_NUMBER == HIGH_TAG_NUMBER {
            while self.byte()? & 0x80 != 0 {}
        }
        Ok((&self.data[start..self.pos], first & CONSTRUCTED != 0))
    }

    fn length(&mut self) -> Result<Length, IdentityError> {
        let first = self.byte()?;
        if first < INDEFINITE_LENGTH {
            return Ok(Length::Definite(usize::from(first)));
        }
        if first == INDEFINITE_LENGTH {
            return Ok(Length::Indefinite);
        }
        let octets = usize::from(first & 0x7f);
        if octets > 4 {
            return Err(malformed("length field longer than four octets"));
        }
        let mut len = 0usize;
        for _ in 0..octets {
            len = (len << 8) | usize::from(self.byte()?);
        }
        Ok(Length::Definite(len))
    }

    fn copy_element(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), IdentityError> {
        if depth > MAX_DEPTH {
            return Err(malformed("nesting too deep"));
        }
        let (tag, constructed) = self.tag()?;
        let tag = tag.to_vec();
        let length = self.length()?;
        let contents = match (length, constructed) {
            (Length::Definite(len), false) => self.take(len)?.to_vec(),
            (Length::Indefinite, false) => {
                return Err(malformed("indefinite length on a primitive element"))
            }
            (Length::Definite(len), true) => {
                let mut inner = Reader {
                    data: self.take(len)?,
                    pos: 0,
                };
                let mut contents = Vec::with_capacity(len);
                let mut elements = Elements::default();
                while inner.pos < inner.data.len() {
                    elements.count()?;
                    inner.copy_element(&mut contents, depth + 1)?;
                }
                contents
            }
            (Length::Indefinite, true) => {
                let mut contents = Vec::new();
                let mut elements = Elements::default();
                while !self.at_end_of_contents() {
                    elements.count()?;
                    self.copy_element(&mut contents, depth + 1)?;
                }
                self.pos += 2;
                contents
            }
        };
        if tag == [OCTET_STRING | CONSTRUCTED] {
            write_element(out, &[OCTET_STRING], &join_segments(&contents)?);
        } else {
            write_element(out, &tag, &contents);
        }
        Ok(())
    }
}

/// Counts the elements inside one constructed element against [`MAX_ELEMENTS`].
#[derive(Default)]
struct Elements(usize);

impl Elements {
    fn count(&mut self) -> Result<(), IdentityError> {
        self.0 += 1;
        if self.0 > MAX_ELEMENTS {
            return Err(malformed(
                "more than 64 elements in one constructed element",
            ));
        }
        Ok(())
    }
}

/// Concatenates the values of already-normalised primitive OCTET STRING segments.
fn join_segments(segments: &[u8]) -> Result<Vec<u8>, IdentityError> {
    let mut reader = Reader {
        data: segments,
        pos: 0,
    };
    let mut joined = Vec::with_capacity(segments.len());
    while reader.pos < segments.len() {
        let (tag, _) = reader.tag()?;
        if tag != [OCTET_STRING] {
            return Err(malformed(
                "constructed OCTET STRING holds a non-OCTET STRING",
            ));
        }
        let Length::Definite(len) = reader.length()? else {
            return Err(malformed("indefinite length on a primitive element"));
        };
        joined.extend_from_slice(reader.take(len)?);
    }
    Ok(joined)
}

/// Writes one element with a minimal definite length.
pub(crate) fn write_element(out: &mut Vec<u8>, tag: &[u8], contents: &[u8]) {
    out.extend_from_slice(tag);
    write_length(out, contents.len());
    out.extend_from_slice(contents);
}

fn write_length(out: &mut Vec<u8>, len: usize) {
    if len < usize::from(INDEFINITE_LENGTH) {
        // Checked just above: the length fits in seven bits.
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let significant = &bytes[bytes.iter().take_while(|byte| **byte == 0).count()..];
    out.push(INDEFINITE_LENGTH | significant.len() as u8);
    out.extend_from_slice(significant);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_support::with_indefinite_lengths;

    #[test]
    fn der_input_is_returned_unchanged() {
        let der = [0x30, 0x06, 0x02, 0x01, 0x05, 0x04, 0x01, 0xff];
        assert_eq!(normalize(&der).unwrap(), der);
    }

    #[test]
    fn nested_indefinite_lengths_become_definite() {
        // SEQUENCE(indef) { [0](indef) { INTEGER 1 } , NULL }
        let ber = [
            0x30, 0x80, 0xa0, 0x80, 0x02, 0x01, 0x01, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00,
        ];
        let der = [0x30, 0x07, 0xa0, 0x03, 0x02, 0x01, 0x01, 0x05, 0x00];
        assert_eq!(normalize(&ber).unwrap(), der);
    }

    #[test]
    fn non_minimal_lengths_are_shortened_and_long_ones_kept() {
        let ber = [0x04, 0x82, 0x00, 0x01, 0xaa];
        assert_eq!(normalize(&ber).unwrap(), [0x04, 0x01, 0xaa]);

        let mut long = vec![0x04, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7u8, 256));
        assert_eq!(normalize(&long).unwrap(), long);
    }

    #[test]
    fn segmented_octet_strings_are_joined() {
        // OCTET STRING(constructed, indef) { "ab", OCTET STRING(constructed) { "c" } }
        let ber = [
            0x24, 0x80, 0x04, 0x02, b'a', b'b', 0x24, 0x03, 0x04, 0x01, b'c', 0x00, 0x00,
        ];
        assert_eq!(normalize(&ber).unwrap(), [0x04, 0x03, b'a', b'b', b'c']);
    }

    #[test]
    fn fully_indefinite_encodings_normalise_back_to_the_original_der() {
        let der = [
            0x30, 0x0c, 0x31, 0x04, 0x02, 0x02, 0x01, 0x00, 0xa0, 0x04, 0x30, 0x02, 0x05, 0x00,
        ];
        let ber = with_indefinite_lengths(&der);
        assert_ne!(ber, der);
        assert_eq!(normalize(&ber).unwrap(), der);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for ber in [
            &[0x30, 0x80, 0x02][..],
            &[0x30, 0x05, 0x02, 0x01],
            &[0x04, 0x84],
        ] {
            assert_eq!(normalize(ber).unwrap_err().reason(), "bad_der");
        }
    }

    #[test]
    fn hostile_nesting_is_bounded() {
        let ber: Vec<u8> = std::iter::repeat_n([0x30, 0x80], 10_000)
            .flatten()
            .collect();
        assert_eq!(
            normalize(&ber).unwrap_err().to_string(),
            "invalid DER: BER: nesting too deep"
        );
    }

    /// A constructed element holding `count` copies of `element`, definite or indefinite.
    fn constructed(tag: u8, element: &[u8], count: usize, indefinite: bool) -> Vec<u8> {
        let contents = element.repeat(count);
        let mut out = vec![tag];
        if indefinite {
            out.push(INDEFINITE_LENGTH);
            out.extend(contents);
            out.extend([0, 0]);
        } else {
            write_length(&mut out, contents.len());
            out.extend(contents);
        }
        out
    }

    #[test]
    fn sixty_four_elements_in_a_set_are_accepted() {
        for indefinite in [false, true] {
            let set = constructed(0x31, &[0x05, 0x00], MAX_ELEMENTS, indefinite);
            let der = constructed(0x31, &[0x05, 0x00], MAX_ELEMENTS, false);
            assert_eq!(normalize(&set).unwrap(), der);
            ensure_bounded(&set).unwrap();
        }
    }

    #[test]
    fn larger_sets_are_refused_before_any_decoder_sorts_them() {
        for indefinite in [false, true] {
            let set = constructed(0x31, &[0x05, 0x00], MAX_ELEMENTS + 1, indefinite);
            assert_eq!(
                ensure_bounded(&set).unwrap_err().to_string(),
                "invalid DER: BER: more than 64 elements in one constructed element"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        assert_eq!(
            normalize(&[0x05, 0x00, 0x00]).unwrap_err().reason(),
            "bad_der"
        );
    }
}
