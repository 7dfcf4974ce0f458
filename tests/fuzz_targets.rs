//! The fuzz targets (`fuzz/`), run on the stable toolchain in every `cargo test`: each target's body gets a fixed
//! number of inputs from a seeded generator — random bytes, random text over the characters its parsers care
//! about, and mutations of valid inputs — so CI executes the same code cargo-fuzz explores on nightly, and a
//! failure reproduces with the same seed.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ITERATIONS: usize = 20_000;
const SEED: u64 = 20261129;

/// Characters that mean something to the parsers: separators, escapes, base64 and path punctuation.
const ALPHABET: &[u8] = b"abcXYZ0189=&;%/+.-_?#*!$' \t\r\n{}[]\"\\:@";

/// Runs `target` on `ITERATIONS` inputs derived from `seeds`.
fn drive(target: fn(&[u8]), seeds: &[&str]) {
    let mut rng = StdRng::seed_from_u64(SEED);
    for seed in seeds {
        target(seed.as_bytes());
    }
    for i in 0..ITERATIONS {
        let input = match i % 3 {
            0 => (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
            1 => (0..rng.gen_range(0..96))
                .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
                .collect(),
            _ => {
                let seed = seeds[rng.gen_range(0..seeds.len())];
                mutate(&mut rng, seed.as_bytes())
            }
        };
        target(&input);
    }
}

/// A few random edits of `seed`: replaced, inserted, deleted and duplicated bytes.
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..rng.gen_range(1..6) {
        let at = rng.gen_range(0..=out.len());
        match rng.gen_range(0..4) {
            0 if at < out.len() => out[at] = ALPHABET[rng.gen_range(0..ALPHABET.len())],
            1 => out.insert(at, ALPHABET[rng.gen_range(0..ALPHABET.len())]),
            2 if at < out.len() => {
                out.remove(at);
            }
            _ => {
                let end = rng.gen_range(at..=out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
        }
    }
    out
}

#[test]
fn sas_token() {
    drive(
        targets::sas_token,
        &[
            "SharedAccessSignature sr=hub%2Fdevices%2Fd&sig=dGVzdA%3D%3D&se=1700000000&skn=owner",
            "SharedAccessSignature sig=AA==&se=-1&sr=x",
            "SharedAccessSignature sr=a&sr=b&sig=&se=",
        ],
    );
}

#[test]
fn connection_string() {
    drive(
        targets::connection_string,
        &[
            "HostName=hub.example;SharedAccessKeyName=iothubowner;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "HostName=hub.example;DeviceId=dev 1;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "HostName=h;DeviceId=a&b=c;SharedAccessKey=AA==",
        ],
    );
}

#[test]
fn request_path() {
    drive(
        targets::request_path,
        &[
            "/devices/d1/messages/deviceBound/6f1c1b2e-6d8c-4a5e-9c2a-1f2e3d4c5b6a/abandon",
            "/MESSAGES/serviceBound/Feedback/",
            "/messages/events/consumerGroups/$Default/partitions/0/checkpoint",
            "api-version=2021-04-12&reject",
            "W/\"12\"",
        ],
    );
}

#[test]
fn property_bag() {
    drive(
        targets::property_bag,
        &[
            "%24.mid=m1&%24.cid=c%201&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high",
            "a=b&&c&=d&%24.to=x",
            "%24.mid=%FF&x=%2",
        ],
    );
}

#[test]
fn mqtt_packet() {
    // Valid packets: CONNECT, PUBLISH at QoS 1 with a bag, SUBSCRIBE, PUBACK, PINGREQ, DISCONNECT.
    drive_bytes(
        targets::mqtt_packet,
        &[
            b"\x10\x1f\x00\x04MQTT\x04\xc2\x00\x3c\x00\x03dev\x00\x04user\x00\x08password"
                .as_slice(),
            b"\x32\x2b\x00\x25devices/dev/messages/events/%24.mid=1\x00\x01hi".as_slice(),
            b"\x82\x0a\x00\x07\x00\x05a/b/#\x01".as_slice(),
            b"\x40\x02\x00\x01\xc0\x00\xe0\x00".as_slice(),
        ],
    );
}

/// As [`drive`], for binary seeds.
fn drive_bytes(target: fn(&[u8]), seeds: &[&[u8]]) {
    let mut rng = StdRng::seed_from_u64(SEED);
    for seed in seeds {
        target(seed);
    }
    for i in 0..ITERATIONS {
        let input: Vec<u8> = match i % 2 {
            0 => (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
            _ => {
                let seed = seeds[rng.gen_range(0..seeds.len())];
                let mut out = seed.to_vec();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..out.len());
                    out[at] = rng.gen();
                }
                out
            }
        };
        target(&input);
    }
}
