//! Which partition a device's messages land in: exactly as Microsoft's own tooling predicts it (spec §3.6.2), so
//! existing tools that compute a device's partition keep working against this hub.

/// Bob Jenkins' lookup3 `hashlittle2`: two 32-bit hashes of `key` from seeds `pc` (primary) and `pb`; returns
/// `(c, b)`. This is the byte-at-a-time reading of the algorithm, which gives the same results as the
/// word-aligned paths of the C original on every input.
pub fn hashlittle2(key: &[u8], pc: u32, pb: u32) -> (u32, u32) {
    let mut a = 0xdead_beef_u32
        .wrapping_add(key.len() as u32)
        .wrapping_add(pc);
    let mut b = a;
    let mut c = a.wrapping_add(pb);
    if key.is_empty() {
        return (c, b);
    }
    let word = |bytes: &[u8]| -> u32 {
        let mut padded = [0u8; 4];
        padded[..bytes.len()].copy_from_slice(bytes);
        u32::from_le_bytes(padded)
    };
    let mut rest = key;
    while rest.len() > 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    // The last 1..=12 bytes, zero-padded.
    let tail = |from: usize| {
        let end = rest.len().min(from + 4);
        if from < end {
            word(&rest[from..end])
        } else {
            0
        }
    };
    a = a.wrapping_add(tail(0));
    b = b.wrapping_add(tail(4));
    c = c.wrapping_add(tail(8));
    final_mix(&mut a, &mut b, &mut c);
    (c, b)
}

/// lookup3 `hashlittle`: the primary hash with one seed.
pub fn hashlittle(key: &[u8], initval: u32) -> u32 {
    hashlittle2(key, initval, 0).0
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Number of logical partitions the key space is cut into before ranges are assigned to real partitions.
const LOGICAL_PARTITIONS: i32 = i16::MAX as i32;

/// The logical partition (0..32767) of a device id: lookup3 of the upper-cased id, both results XORed, the low 16
/// bits taken as a signed value, remainder by 32767 keeping the dividend's sign, absolute value.
pub fn logical_partition(device_id: &str) -> i32 {
    let upper = device_id.to_ascii_uppercase();
    let (hash1, hash2) = hashlittle2(upper.as_bytes(), 0, 0);
    let short = (hash1 ^ hash2) as u16 as i16;
    (short as i32 % LOGICAL_PARTITIONS).abs()
}

/// The partition (`0..count`) that holds `device_id`'s messages.
pub fn partition_for(device_id: &str, count: u32) -> u32 {
    assign(logical_partition(device_id), count)
}

/// Cuts the logical space into `count` contiguous ranges, the first `32767 mod count` of them one wider.
fn assign(logical: i32, count: u32) -> u32 {
    let count = count.max(1) as i32;
    let short_width = LOGICAL_PARTITIONS / count;
    let remaining = LOGICAL_PARTITIONS - count * short_width;
    let large_width = short_width + 1;
    let large_span = large_width * remaining;
    let index = if logical < large_span {
        logical / large_width
    } else {
        remaining + (logical - large_span) / short_width
    };
    index as u32
}

/// A partition of the hub's event stream, below the partition count by construction: only [`crate::d2c::D2c`]
/// makes one, from a device id or from a number a client sent that it has checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct PartitionId(i32);

impl PartitionId {
    /// `n` must be below the partition count: the caller has checked it.
    pub(super) fn new(n: u32) -> PartitionId {
        PartitionId(n as i32)
    }

    /// Its position among the partitions (0 to count − 1), e.g. to pick its writer.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup3_self_test_values() {
        // From lookup3.c's driver5().
        assert_eq!(hashlittle2(b"", 0, 0), (0xdeadbeef, 0xdeadbeef));
        assert_eq!(hashlittle2(b"", 0, 0xdeadbeef), (0xbd5b7dde, 0xdeadbeef));
        assert_eq!(
            hashlittle2(b"", 0xdeadbeef, 0xdeadbeef),
            (0x9c093ccd, 0xbd5b7dde)
        );
        let four_score = b"Four score and seven years ago";
        assert_eq!(four_score.len(), 30);
        assert_eq!(hashlittle(four_score, 0), 0x17770551);
        assert_eq!(hashlittle(four_score, 1), 0xcd628161);
        assert_eq!(hashlittle2(four_score, 0, 0), (0x17770551, 0xce7226e6));
        assert_eq!(hashlittle2(four_score, 0, 1), (0xe3607cae, 0xbd371de4));
        assert_eq!(hashlittle2(four_score, 1, 0), (0xcd628161, 0x6cbea4b3));
    }

    #[test]
    fn every_length_of_tail_is_hashed() {
        // Each byte must change the result, including the 12th of a full last block and the 13th (next block).
        let base = b"abcdefghijklmnopqrstuvwxy".to_vec();
        for len in 1..base.len() {
            let key = &base[..len];
            let mut changed = key.to_vec();
            changed[len - 1] ^= 1;
            assert_ne!(
                hashlittle2(key, 0, 0),
                hashlittle2(&changed, 0, 0),
                "len {len}"
            );
        }
    }

    #[test]
    fn partition_mapping_properties() {
        for count in [1u32, 2, 3, 4, 7, 32, 128] {
            let mut seen = vec![0usize; count as usize];
            for i in 0..20_000 {
                let id = format!("device-{i}");
                let p = partition_for(&id, count);
                assert!(p < count);
                // Case-insensitive and deterministic.
                assert_eq!(p, partition_for(&id.to_uppercase(), count));
                assert_eq!(p, partition_for(&id, count));
                seen[p as usize] += 1;
            }
            // Every partition gets a fair share (within 50% of the mean).
            let mean = 20_000 / count as usize;
            for (p, n) in seen.iter().enumerate() {
                assert!(
                    *n > mean / 2 && *n < mean * 3 / 2,
                    "count {count}: partition {p} got {n}"
                );
            }
        }
        // Logical partitions stay inside 0..32767 and the ranges are contiguous: logical 0 is in partition 0 and
        // the highest logical partition is in the last one.
        for i in 0..5_000 {
            let l = logical_partition(&format!("d{i}"));
            assert!((0..LOGICAL_PARTITIONS).contains(&l));
        }
    }

    #[test]
    fn ranges_cover_the_logical_space_in_order() {
        // Monotone in the logical partition, first and last
        // partitions used, range sizes differ by at most one.
        for count in [1u32, 3, 4, 32, 128] {
            let of = |l: i32| assign(l, count);
            let mut sizes = vec![0; count as usize];
            let mut last = 0;
            for l in 0..LOGICAL_PARTITIONS {
                let p = of(l);
                assert!(p >= last && p < count);
                last = p;
                sizes[p as usize] += 1;
            }
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "count {count}: {min}..{max}");
        }
    }
}
