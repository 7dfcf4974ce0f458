//! Response header names in exact case.
//!
//! HTTP header names are case-insensitive, but the Azure IoT C SDK looks response headers up with case-sensitive
//! compares (`ETag`, `ContentType`, `iothub-app-MyProperty`). hyper stores names in lower case and writes them so,
//! unless the response carries hyper's (crate-private) header-case map, which it then follows. The only public way to
//! obtain such a map is to have hyper parse a request with `preserve_header_case` on: so we let hyper parse a
//! synthetic request that spells the wanted names, in memory, and hand the resulting extensions to the response.
//! Maps are cached per set of names; HTTP/2 is unaffected (its names are lower case by definition).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::Extensions;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

/// Names every response writes in this case when present (spec §9). Framing headers (`Content-Length`,
/// `Transfer-Encoding`) cannot be spelled in the synthetic request, and hyper writes those itself.
const FIXED: &[&str] = &[
    "ETag",
    "ContentType",
    "ContentEncoding",
    "Content-Type",
    "Location",
    "Retry-After",
];

/// Extra names a handler wants in exact case (e.g. `iothub-app-{name}` with the property's own case), put in the
/// response's extensions.
#[derive(Debug, Clone, Default)]
pub struct ExactNames(pub Vec<String>);

const CACHE_LIMIT: usize = 4096;

static CACHE: Mutex<Option<HashMap<String, Extensions>>> = Mutex::new(None);

/// Middleware: gives every HTTP/1 response the header-case map for the fixed names plus its [`ExactNames`].
pub async fn exact_header_case(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let extra = response.extensions_mut().remove::<ExactNames>();
    let names: Vec<&str> = FIXED
        .iter()
        .copied()
        .chain(extra.iter().flat_map(|e| e.0.iter().map(String::as_str)))
        .filter(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok())
        .collect();
    if let Some(map) = case_map(&names).await {
        response.extensions_mut().extend(map);
    }
    response
}

async fn case_map(names: &[&str]) -> Option<Extensions> {
    let key = names.join("\n");
    if let Some(found) = CACHE
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return Some(found.clone());
    }
    let map = parse_with_hyper(names).await?;
    let mut cache = CACHE.lock().unwrap();
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= CACHE_LIMIT {
        cache.clear();
    }
    cache.insert(key, map.clone());
    Some(map)
}

async fn parse_with_hyper(names: &[&str]) -> Option<Extensions> {
    let mut raw = b"GET / HTTP/1.1\r\nhost: case\r\n".to_vec();
    for name in names {
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(b": x\r\n");
    }
    raw.extend_from_slice(b"\r\n");

    let (mut client, server) = tokio::io::duplex(raw.len() + 4096);
    let (tx, rx) = tokio::sync::oneshot::channel::<Extensions>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(req.extensions().clone());
        }
        async { Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new())) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(server), service);
    let capture = async move {
        client.write_all(&raw).await.ok()?;
        rx.await.ok()
    };
    tokio::select! {
        map = capture => map,
        _ = connection => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncReadExt;

    /// Serves one `GET /` with `service` over an in-memory HTTP/1.1 connection; the response head as written.
    async fn written_head<S>(service: S) -> String
    where
        S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<axum::body::Body>,
            Error = std::convert::Infallible,
        >,
        S::Future: Send + 'static,
    {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let connection = hyper::server::conn::http1::Builder::new()
            .preserve_header_case(true)
            .serve_connection(TokioIo::new(server), service);
        let exchange = async move {
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut raw = Vec::new();
            client.read_to_end(&mut raw).await.unwrap();
            String::from_utf8(raw).unwrap()
        };
        let (raw, _) = tokio::join!(exchange, connection);
        raw.split("\r\n\r\n").next().unwrap().to_string()
    }

    /// A response with lower-case `etag` and `iothub-app-myprop` headers, carrying `extensions`.
    async fn head_with(extensions: Option<Extensions>) -> String {
        let extensions = Arc::new(Mutex::new(extensions));
        written_head(hyper::service::service_fn(move |_| {
            let mut response = hyper::Response::new(axum::body::Body::empty());
            response
                .headers_mut()
                .insert("etag", http::HeaderValue::from_static("\"1\""));
            response
                .headers_mut()
                .insert("iothub-app-myprop", http::HeaderValue::from_static("v"));
            if let Some(map) = extensions.lock().unwrap().take() {
                *response.extensions_mut() = map;
            }
            async move { Ok::<_, std::convert::Infallible>(response) }
        }))
        .await
    }

    #[tokio::test]
    async fn the_case_map_hyper_hands_back_spells_each_name_exactly() {
        let map = parse_with_hyper(&["ETag", "iothub-app-MyProp"])
            .await
            .unwrap();
        let head = head_with(Some(map)).await;
        assert!(head.contains("\r\nETag: \"1\""), "{head}");
        assert!(head.contains("\r\niothub-app-MyProp: v"), "{head}");
        // Without the map hyper writes lower case: the check above tells the two apart.
        let head = head_with(None).await;
        assert!(head.contains("\r\netag: \"1\""), "{head}");
        assert!(head.contains("\r\niothub-app-myprop: v"), "{head}");
    }

    #[tokio::test]
    async fn the_middleware_writes_every_fixed_name_and_a_handlers_extra_names_exactly() {
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(|| async {
                    let mut response = Response::new(axum::body::Body::empty());
                    for name in FIXED {
                        let lower = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
                        response
                            .headers_mut()
                            .insert(lower, http::HeaderValue::from_static("v"));
                    }
                    response
                        .headers_mut()
                        .insert("iothub-app-roomname", http::HeaderValue::from_static("v"));
                    response
                        .extensions_mut()
                        .insert(ExactNames(vec!["iothub-app-RoomName".to_string()]));
                    response
                }),
            )
            .layer(axum::middleware::from_fn(exact_header_case));
        let head = written_head(hyper_util::service::TowerToHyperService::new(app)).await;
        for name in FIXED.iter().chain(&["iothub-app-RoomName"]) {
            assert!(head.contains(&format!("\r\n{name}: v")), "{name} in {head}");
        }
        for name in ["ContentEncoding", "Location", "Retry-After"] {
            assert!(FIXED.contains(&name), "{name} is written in exact case");
        }
    }
}

/// The names of a request's `iothub-app-*` headers as the client spelled them (application property names are
/// case-sensitive, and hyper hands handlers lower-case names). Always present in a request's extensions: empty when
/// the request has no such headers.
#[derive(Debug, Clone, Default)]
pub struct RequestNames(HashMap<String, Vec<String>>);

impl RequestNames {
    /// The client's spelling of the `occurrence`-th header named `lower` (lower case), or `lower` itself.
    pub fn original<'a>(&'a self, lower: &'a str, occurrence: usize) -> &'a str {
        self.0
            .get(lower)
            .and_then(|spellings| spellings.get(occurrence))
            .map(String::as_str)
            .unwrap_or(lower)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestNames {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestNames>()
            .cloned()
            .unwrap_or_default())
    }
}

const APP_PREFIX: &str = "iothub-app-";

/// Middleware: records the client's spelling of `iothub-app-*` request header names.
///
/// The server keeps hyper's (crate-private) record of the request's header case (`preserve_header_case`). The only
/// public way to read it is to let hyper write a response that carries it: so a response with the same header
/// names (and index values, never the real ones) is written in memory, and the spellings are read off its bytes.
pub async fn recover_request_case(mut request: Request, next: Next) -> Response {
    let mut counts: Vec<(http::HeaderName, usize)> = Vec::new();
    for name in request.headers().keys() {
        if name.as_str().starts_with(APP_PREFIX) {
            counts.push((name.clone(), request.headers().get_all(name).iter().count()));
        }
    }
    let names = if counts.is_empty() {
        RequestNames::default()
    } else {
        spellings(request.extensions(), &counts)
            .await
            .unwrap_or_default()
    };
    request.extensions_mut().insert(names);
    next.run(request).await
}

async fn spellings(
    extensions: &Extensions,
    counts: &[(http::HeaderName, usize)],
) -> Option<RequestNames> {
    let mut echo = hyper::Response::new(Empty::<Bytes>::new());
    for (name, count) in counts {
        for i in 0..*count {
            echo.headers_mut()
                .append(name.clone(), http::HeaderValue::from(i));
        }
    }
    *echo.extensions_mut() = extensions.clone();
    let echo = Arc::new(Mutex::new(Some(echo)));
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let service = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
        let response = echo.lock().unwrap().take();
        async move {
            Ok::<_, std::convert::Infallible>(
                response.unwrap_or_else(|| hyper::Response::new(Empty::<Bytes>::new())),
            )
        }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), service);
    let exchange = async move {
        use tokio::io::AsyncReadExt;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: case\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut raw = Vec::new();
        client.read_to_end(&mut raw).await.ok()?;
        Some(raw)
    };
    let (raw, _) = tokio::join!(exchange, connection);
    let raw = String::from_utf8(raw?).ok()?;
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    for line in raw.split("\r\n\r\n").next()?.split("\r\n").skip(1) {
        let Some((name, index)) = line.split_once(": ") else {
            continue;
        };
        let lower = name.to_ascii_lowercase();
        if !lower.starts_with(APP_PREFIX) {
            continue;
        }
        let Ok(index) = index.trim().parse::<usize>() else {
            continue;
        };
        let spellings = names.entry(lower).or_default();
        if spellings.len() <= index {
            spellings.resize(index + 1, String::new());
        }
        spellings[index] = name.to_string();
    }
    Some(RequestNames(names))
}
