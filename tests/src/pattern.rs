//! A deterministic byte stream whose every position can be regenerated and
//! checked, so that gigabytes can be sent and verified without keeping them:
//! byte `pos` of the stream is `TABLE[pos % LEN]`, where the table's 8-byte
//! words all differ and `LEN` (a prime) lines up with no buffer size.

use std::sync::OnceLock;

/// The period of the stream, in bytes (a prime a little under 1 MiB).
pub const LEN: usize = 1_048_573;

fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..LEN)
            .map(|i| {
                let word = (i / 8) as u64 ^ 0x5DEE_CE66_D00D_F00D;
                (word.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (8 * (i % 8))) as u8
            })
            .collect()
    })
}

/// Calls `f(table_slice, at)` for consecutive pieces covering stream bytes
/// `offset .. offset + len`, where `at` is the piece's start relative to `offset`.
fn pieces(offset: u64, len: usize, mut f: impl FnMut(&[u8], usize)) {
    let table = table();
    let mut done = 0;
    while done < len {
        let start = ((offset + done as u64) % LEN as u64) as usize;
        let n = (LEN - start).min(len - done);
        f(&table[start..start + n], done);
        done += n;
    }
}

/// Fills `buf` with stream bytes `offset .. offset + buf.len()`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    pieces(offset, buf.len(), |piece, at| {
        buf[at..at + piece.len()].copy_from_slice(piece)
    });
}

/// Where `data`, read at stream position `offset`, first departs from the
/// stream (relative to `offset`), or `None` when it matches.
pub fn first_difference(offset: u64, data: &[u8]) -> Option<usize> {
    let mut first = None;
    pieces(offset, data.len(), |piece, at| {
        if first.is_none() {
            let got = &data[at..at + piece.len()];
            if got != piece {
                first = got
                    .iter()
                    .zip(piece)
                    .position(|(a, b)| a != b)
                    .map(|p| at + p);
            }
        }
    });
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_line_up_across_the_period() {
        let mut whole = vec![0u8; 3 * LEN + 17];
        fill(5, &mut whole);
        // Any window, filled on its own, matches the same span of the whole.
        for (off, len) in [(0, 10), (LEN - 3, 7), (2 * LEN + 1, LEN)] {
            let mut part = vec![0u8; len];
            fill(5 + off as u64, &mut part);
            assert_eq!(part, whole[off..off + len]);
            assert_eq!(first_difference(5 + off as u64, &part), None);
        }
        whole[LEN + 4] ^= 1;
        assert_eq!(first_difference(5, &whole), Some(LEN + 4));
        // Shifted by one byte, the stream no longer matches.
        assert!(first_difference(6, &whole[..100]).is_some());
    }
}
