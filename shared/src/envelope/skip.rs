//! Finding where a JSON value ends without parsing it: what lets the routing parse pass over
//! `data.signals` (most of a 50 KB body) in about a sixth of the time a parse takes
//! (`bench/latest.md`).
//!
//! A container is skipped 64 bytes at a time, the way simdjson finds structure: 16-byte vector
//! compares give bit masks of the quotes, backslashes, openers and closers in the block; a
//! prefix XOR of the unescaped quotes marks the bytes inside strings; the brackets outside strings
//! are then counted with `popcount`, and only a block where the depth could reach zero is walked
//! bit by bit. `[` and `{` count alike (as do `]` and `}`): they differ only in bit 5, so one
//! compare after `| 0x20` finds both.
//!
//! This checks that strings end and brackets balance, nothing more: a skipped value with a trailing
//! comma, a bad number or mismatched bracket kinds is passed over. That is what the receiver needs
//! (the body is signed; the processor parses it in full and dead-letters what it cannot read).
//! The vectors are `wide`'s: SSE2 on x86-64 and NEON on aarch64, plain arrays elsewhere.

use wide::u8x16;

/// Bit `i` set where byte `i` of a 64-byte block is the character named.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Masks {
    quote: u64,
    backslash: u64,
    /// `{` or `[`.
    open: u64,
    /// `}` or `]`.
    close: u64,
}

impl Masks {
    fn of(block: &[u8; 64]) -> Self {
        let quote = u8x16::splat(b'"');
        let backslash = u8x16::splat(b'\\');
        let open = u8x16::splat(b'{');
        let close = u8x16::splat(b'}');
        let bit5 = u8x16::splat(0x20);
        let mut m = Self::default();
        let (chunks, _) = block.as_chunks::<16>();
        for (k, &lanes) in chunks.iter().enumerate() {
            let v = u8x16::new(lanes);
            // `[` | 0x20 == `{` and `]` | 0x20 == `}`; no other byte maps onto either.
            let folded = v | bit5;
            let at = |x: u8x16, c: u8x16| u64::from(x.simd_eq(c).to_bitmask()) << (16 * k);
            m.quote |= at(v, quote);
            m.backslash |= at(v, backslash);
            m.open |= at(folded, open);
            m.close |= at(folded, close);
        }
        m
    }
}

/// Bit `i` of the result is the XOR of bits `0..=i` of `x`: applied to the quote mask, it is set
/// from an opening quote up to (not including) its closing quote.
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

/// The bytes escaped by a backslash in a block (bit 0 may be escaped by the previous block,
/// `carry`), and whether the block's last byte escapes the next block's first.
fn escaped(backslash: u64, carry: bool) -> (u64, bool) {
    let mut escaped = u64::from(carry);
    let mut next_carry = false;
    let mut rest = backslash;
    while rest != 0 {
        let p = rest.trailing_zeros();
        // A backslash that is itself escaped (`\\`) escapes nothing.
        if escaped & (1 << p) == 0 {
            if p == 63 {
                next_carry = true;
            } else {
                escaped |= 1 << (p + 1);
            }
        }
        rest &= rest - 1;
    }
    (escaped, next_carry)
}

/// Where the container opening at `b[start]` (`{` or `[`) ends: the index just after its closing
/// bracket, or `None` when the input ends first.
pub fn container(b: &[u8], start: usize) -> Option<usize> {
    let mut pos = start;
    let mut depth: u32 = 0;
    // All ones while inside a string at the start of the block.
    let mut in_string: u64 = 0;
    let mut escape_carry = false;
    let mut tail = [b' '; 64];
    while pos < b.len() {
        let rest = &b[pos..];
        let block: &[u8; 64] = match rest.first_chunk::<64>() {
            Some(full) => full,
            None => {
                // The last, short block, padded with spaces (which are never structure).
                tail[..rest.len()].copy_from_slice(rest);
                tail[rest.len()..].fill(b' ');
                &tail
            }
        };
        let m = Masks::of(block);
        let mut quote = m.quote;
        if m.backslash != 0 || escape_carry {
            let (esc, carry) = escaped(m.backslash, escape_carry);
            quote &= !esc;
            escape_carry = carry;
        }
        let inside = prefix_xor(quote) ^ in_string;
        // Sign-extend the last byte's bit: still inside a string when the next block starts.
        in_string = ((inside as i64) >> 63) as u64;
        let open = m.open & !inside;
        let close = m.close & !inside;
        let closes = close.count_ones();
        if depth > closes {
            depth = depth + open.count_ones() - closes;
        } else {
            let mut structure = open | close;
            while structure != 0 {
                let p = structure.trailing_zeros();
                if open & (1 << p) != 0 {
                    depth += 1;
                } else {
                    depth -= 1;
                    if depth == 0 {
                        return Some(pos + p as usize + 1);
                    }
                }
                structure &= structure - 1;
            }
        }
        pos += 64;
    }
    None
}

/// Where the string whose opening quote is at `b[start]` ends: the index just after its closing
/// quote, or `None` when the input ends first. Escapes are stepped over, not checked.
pub fn string(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// serde_json's end of the first value of `b[start..]`, the reference.
    fn serde_end(b: &[u8], start: usize) -> usize {
        let mut it =
            serde_json::Deserializer::from_slice(&b[start..]).into_iter::<serde::de::IgnoredAny>();
        assert!(matches!(it.next(), Some(Ok(_))), "not JSON");
        start + it.byte_offset()
    }

    /// Random JSON text whose strings are full of what the skipper must not mistake for structure.
    fn gen(rng: &mut rand::rngs::StdRng, depth: u32, out: &mut String) {
        const TRICKY: &[&str] = &[
            "a", "\\\"", "\\\\", "\\\\\\\"", "{", "}", "[", "]", "\\u005d", "ü", "🚗", " ", "\\n",
            ",",
        ];
        match rng.random_range(0..if depth == 0 { 4 } else { 7 }) {
            0 => out.push_str(["null", "true", "-1.5e3", "0"][rng.random_range(0..4)]),
            1 | 2 => {
                out.push('"');
                for _ in 0..rng.random_range(0..40) {
                    out.push_str(TRICKY[rng.random_range(0..TRICKY.len())]);
                }
                out.push('"');
            }
            3 => out.push_str(&rng.random_range(0..1_000_000).to_string()),
            4 | 5 => {
                out.push('{');
                for k in 0..rng.random_range(0..6) {
                    if k > 0 {
                        out.push(',');
                    }
                    out.push_str(r#""k\"}":"#);
                    gen(rng, depth - 1, out);
                }
                out.push('}');
            }
            _ => {
                out.push('[');
                for k in 0..rng.random_range(0..6) {
                    if k > 0 {
                        out.push_str(" , ");
                    }
                    gen(rng, depth - 1, out);
                }
                out.push(']');
            }
        }
    }

    /// On random containers, at every alignment against the 64-byte blocks, the skipper ends
    /// exactly where serde_json's parser does.
    #[test]
    fn container_ends_where_a_parser_does() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut checked = 0;
        while checked < 3000 {
            let mut v = String::new();
            gen(&mut rng, 5, &mut v);
            if !v.starts_with(['{', '[']) {
                continue;
            }
            let pad = rng.random_range(0..64);
            let text = format!("{}{v} ,\"after\"]", " ".repeat(pad));
            let b = text.as_bytes();
            assert_eq!(container(b, pad), Some(serde_end(b, pad)), "{text}");
            checked += 1;
        }
    }

    #[test]
    fn escapes_across_a_block_boundary() {
        // Runs of backslashes that straddle a 64-byte block: an odd run escapes the quote after it.
        for run in 1..6 {
            for at in 50..70 {
                let escaped_quote = if run % 2 == 1 { "\"]" } else { "" };
                let s = format!(
                    "[\"{}{}{escaped_quote}\" , \"]\"]",
                    "x".repeat(at),
                    "\\".repeat(run)
                );
                let b = s.as_bytes();
                assert_eq!(container(b, 0), Some(serde_end(b, 0)), "{s}");
            }
        }
    }

    #[test]
    fn unterminated_input_has_no_end() {
        for s in [
            &b"[1,2"[..],
            b"{\"a\":\"}\"",
            b"[\"\\\"]",
            b"{\"a\":[{}]",
            b"[\"",
        ] {
            assert_eq!(container(s, 0), None, "{}", String::from_utf8_lossy(s));
        }
        assert_eq!(string(b"\"abc", 0), None);
        assert_eq!(string(b"\"ab\\\"", 0), None);
        assert_eq!(string(b"\"ab\\\\\" x", 0), Some(6));
    }

    #[test]
    fn masks_find_each_character() {
        let mut block = [b'a'; 64];
        for (i, c) in [
            (0, b'"'),
            (17, b'\\'),
            (33, b'['),
            (40, b'{'),
            (50, b']'),
            (63, b'}'),
        ] {
            block[i] = c;
        }
        assert_eq!(
            Masks::of(&block),
            Masks {
                quote: 1,
                backslash: 1 << 17,
                open: (1 << 33) | (1 << 40),
                close: (1 << 50) | (1 << 63),
            }
        );
    }
}
