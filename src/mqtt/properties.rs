//! IoT Hub's property bag: the URL-encoded `name=value&name=value` that ends an MQTT topic (after
//! `messages/events/` from a device, after `messages/devicebound/` to it). System properties are named `$.mid`,
//! `$.cid`, …; every other name is an application property.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Properties one bag may hold; more closes the connection (memory per packet stays bounded).
pub const MAX_PROPERTIES: usize = 128;

/// A property bag that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BagError {
    #[error("the property bag holds more than {MAX_PROPERTIES} properties")]
    TooMany,
    #[error("a property name is empty")]
    EmptyName,
    #[error("a property is not valid percent-encoded UTF-8")]
    NotUtf8,
}

/// The properties of a bag, decoded, in the order they came. Names stay as sent (case matters for
/// application properties).
pub fn parse(bag: &str) -> Result<Vec<(String, String)>, BagError> {
    let mut properties = Vec::new();
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        if properties.len() == MAX_PROPERTIES {
            return Err(BagError::TooMany);
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)?;
        if name.is_empty() {
            return Err(BagError::EmptyName);
        }
        properties.push((name, decode(value)?));
    }
    Ok(properties)
}

fn decode(text: &str) -> Result<String, BagError> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| BagError::NotUtf8)
}

/// Everything but unreserved characters is encoded, as the SDKs' URL encoders do; `$` and `.` of system names
/// too would be legal, but IoT Hub writes `$` as `%24`, and the SDKs decode either.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Writes `properties` as a bag.
pub fn write<'a>(properties: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut bag = String::new();
    for (name, value) in properties {
        if !bag.is_empty() {
            bag.push('&');
        }
        bag.extend(utf8_percent_encode(name, ENCODE));
        bag.push('=');
        bag.extend(utf8_percent_encode(value, ENCODE));
    }
    bag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_sdks_write() {
        let bag = "%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&temp%20alert=high&flag";
        assert_eq!(
            parse(bag).unwrap(),
            vec![
                ("$.mid".into(), "m 1".into()),
                ("$.ct".into(), "application/json".into()),
                ("$.ce".into(), "utf-8".into()),
                ("temp alert".into(), "high".into()),
                ("flag".into(), "".into()),
            ]
        );
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("=x"), Err(BagError::EmptyName));
        assert_eq!(parse("a=%FF"), Err(BagError::NotUtf8));
        let many = vec!["a=b"; MAX_PROPERTIES + 1].join("&");
        assert_eq!(parse(&many), Err(BagError::TooMany));
    }

    #[test]
    fn writes_what_it_reads() {
        let properties = [("$.mid", "a&b=c"), ("ünï", "100%"), ("x", "")];
        let bag = write(properties);
        assert_eq!(bag.matches('&').count(), 2);
        let back = parse(&bag).unwrap();
        let back: Vec<(&str, &str)> = back.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(back, properties);
    }
}
