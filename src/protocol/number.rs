//! Number parsing with the exact acceptance rules of memcached's
//! `safe_strtoull` / `safe_strtoul` / `safe_strtol`, which wrap C's `strtoull`
//! and `strtol`: leading whitespace and a sign are allowed, the number must be
//! followed by the end of the token or a whitespace character, and overflow is
//! rejected. Values then narrow to 32 bits the way C assignments do
//! (`set k 4294967296 0 1` stores flags 0, as memcached does).

/// C `isspace` in the "C" locale.
#[inline]
pub fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Digits of a C-style number: (negative, magnitude or None on overflow,
/// rest after the digits). None when there are no digits at all.
fn c_number(s: &[u8]) -> Option<(bool, Option<u64>, &[u8])> {
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let mut neg = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        neg = s[i] == b'-';
        i += 1;
    }
    let start = i;
    let mut value: Option<u64> = Some(0);
    while i < s.len() && s[i].is_ascii_digit() {
        value = value
            .and_then(|v| v.checked_mul(10))
            .and_then(|v| v.checked_add(u64::from(s[i] - b'0')));
        i += 1;
    }
    if i == start {
        return None;
    }
    Some((neg, value, &s[i..]))
}

/// Whether what follows a number is acceptable: nothing, or whitespace.
#[inline]
fn clean_end(rest: &[u8]) -> bool {
    rest.first().is_none_or(|&b| is_c_space(b))
}

/// memcached `safe_strtoull`: an unsigned 64-bit number.
pub fn parse_u64(token: &[u8]) -> Option<u64> {
    let (neg, magnitude, rest) = c_number(token)?;
    let magnitude = magnitude?; // ERANGE
    if !clean_end(rest) {
        return None;
    }
    let value = if neg {
        magnitude.wrapping_neg()
    } else {
        magnitude
    };
    if neg && (value as i64) < 0 {
        return None; // "-5" would wrap to a huge number: refused
    }
    Some(value)
}

/// memcached `safe_strtoul` into a `uint32_t`: parsed as unsigned long, then
/// truncated to 32 bits.
pub fn parse_u32_truncating(token: &[u8]) -> Option<u32> {
    parse_u64(token).map(|v| v as u32)
}

/// memcached `safe_strtol` into an `int32_t`: parsed as a signed long, then
/// truncated to 32 bits.
pub fn parse_i32_truncating(token: &[u8]) -> Option<i32> {
    let (neg, magnitude, rest) = c_number(token)?;
    let magnitude = magnitude?;
    let value: i64 = if neg {
        if magnitude > i64::MAX as u64 + 1 {
            return None;
        }
        (magnitude as i64).wrapping_neg()
    } else {
        i64::try_from(magnitude).ok()?
    };
    if !clean_end(rest) {
        return None;
    }
    Some(value as i32)
}

/// The numeric value of a stored item for incr/decr: `safe_strtoull` over the
/// value followed by memcached's CRLF.
pub fn parse_value_u64(value: &[u8]) -> Option<u64> {
    let (neg, magnitude, rest) = c_number(value)?;
    let magnitude = magnitude?;
    // The value is followed by "\r\n" in memcached's item, so reaching the end
    // of our bytes counts as whitespace; C string functions also stop at NUL.
    if !rest.first().is_none_or(|&b| is_c_space(b) || b == 0) {
        return None;
    }
    let v = if neg {
        magnitude.wrapping_neg()
    } else {
        magnitude
    };
    if neg && (v as i64) < 0 {
        return None;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtoull_rules() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"-0"), Some(0));
        assert_eq!(parse_u64(b"+7"), Some(7));
        assert_eq!(parse_u64(b"\t7"), Some(7));
        assert_eq!(parse_u64(b"7\t"), Some(7));
        assert_eq!(parse_u64(b"7x"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-"), None);
        // strtoull negates: "-18446744073709551615" is 1, which is not negative.
        assert_eq!(parse_u64(b"-18446744073709551615"), Some(1));
    }

    #[test]
    fn narrowing_matches_c_assignment() {
        assert_eq!(parse_u32_truncating(b"4294967296"), Some(0));
        assert_eq!(
            parse_u32_truncating(b"18446744073709551615"),
            Some(u32::MAX)
        );
        assert_eq!(parse_u32_truncating(b"-1"), None);
        assert_eq!(parse_i32_truncating(b"2147483648"), Some(i32::MIN));
        assert_eq!(parse_i32_truncating(b"-2147483649"), Some(i32::MAX));
        assert_eq!(parse_i32_truncating(b"4294967296"), Some(0));
        assert_eq!(parse_i32_truncating(b"99999999999"), Some(1_215_752_191));
        assert_eq!(parse_i32_truncating(b"-1"), Some(-1));
        assert_eq!(parse_i32_truncating(b"9223372036854775808"), None);
        assert_eq!(parse_i32_truncating(b"-9223372036854775808"), Some(0));
        assert_eq!(parse_i32_truncating(b"abc"), None);
    }

    #[test]
    fn item_values() {
        assert_eq!(parse_value_u64(b"12"), Some(12));
        assert_eq!(parse_value_u64(b"  12"), Some(12));
        assert_eq!(parse_value_u64(b"12 34"), Some(12));
        assert_eq!(parse_value_u64(b"12abc"), None);
        assert_eq!(parse_value_u64(b"12\0abc"), Some(12));
        assert_eq!(parse_value_u64(b""), None);
        assert_eq!(parse_value_u64(b"   "), None);
    }
}
