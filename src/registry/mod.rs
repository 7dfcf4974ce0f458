//! Device identities: the registry's model, its SQL and its IoT Hub-compatible REST routes.

pub mod model;
pub mod routes;
pub mod store;

/// Device ids as IoT Hub allows them: 1–128 ASCII letters, digits and `- : . + % _ # * ? ! ( ) , = @ ; $ '`,
/// case-sensitive.
pub fn valid_device_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b':'
                        | b'.'
                        | b'+'
                        | b'%'
                        | b'_'
                        | b'#'
                        | b'*'
                        | b'?'
                        | b'!'
                        | b'('
                        | b')'
                        | b','
                        | b'='
                        | b'@'
                        | b';'
                        | b'$'
                        | b'\''
                )
        })
}

#[cfg(test)]
mod tests {
    use super::valid_device_id;

    #[test]
    fn device_id_character_set() {
        assert!(valid_device_id("a-b:c.d+e%f_g#h*i?j!k(l)m,n=o@p;q$r's"));
        assert!(valid_device_id(&"x".repeat(128)));
        assert!(!valid_device_id(&"x".repeat(129)));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("a/b"));
        assert!(!valid_device_id("a b"));
        assert!(!valid_device_id("é"));
    }
}
