//! Multipart uploads streamed into the sandbox: each file part goes to the
//! agent chunk by chunk, and the 128 MiB limit is enforced while streaming.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use futures_util::StreamExt;
use sessiond_agent::proto::{FileEntry, DATA_DIR, MAX_UPLOAD_BYTES};

use super::error::ApiError;
use crate::agent_client::{AgentCallError, AgentClient};

/// Room for multipart headers and boundaries around a maximal file.
const ENVELOPE_SLACK: u64 = 1 << 20;

pub enum UploadFailure {
    Api(ApiError),
    Agent(AgentCallError),
}

fn multer_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::FieldSizeExceeded { .. } | multer::Error::StreamSizeExceeded { .. } => {
            ApiError::payload_too_large(MAX_UPLOAD_BYTES)
        }
        other => ApiError::validation(format!("the multipart body is malformed: {other}")),
    }
}

/// Starts parsing a multipart request; refuses at once what is surely too big.
pub fn open(headers: &HeaderMap, body: Body) -> Result<multer::Multipart<'static>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(ct).map_err(|_| {
        ApiError::validation(format!(
            "expected a multipart/form-data body with a file in the field 'file', got content type {ct:?}"
        ))
    })?;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > MAX_UPLOAD_BYTES + ENVELOPE_SLACK {
            return Err(ApiError::payload_too_large(MAX_UPLOAD_BYTES));
        }
    }
    let limits = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .per_field(MAX_UPLOAD_BYTES)
            .whole_stream(MAX_UPLOAD_BYTES + ENVELOPE_SLACK),
    );
    Ok(multer::Multipart::with_constraints(
        body.into_data_stream(),
        boundary,
        limits,
    ))
}

/// The next part that carries a file (a filename); other form fields are skipped.
pub async fn next_file(
    m: &mut multer::Multipart<'static>,
) -> Result<Option<multer::Field<'static>>, ApiError> {
    loop {
        let Some(field) = m.next_field().await.map_err(multer_error)? else {
            return Ok(None);
        };
        if field.file_name().is_some() {
            return Ok(Some(field));
        }
        if field.name() == Some("file") {
            return Err(ApiError::validation(
                "the 'file' part has no filename: set filename in its Content-Disposition",
            ));
        }
    }
}

/// Where a part lands, relative to the data dir: bare, relative, or
/// absolute under `/mnt/data`; the agent refuses anything that escapes.
pub fn target_name(file_name: &str, dir: Option<&str>) -> Result<String, ApiError> {
    let name = file_name.trim();
    let name = match name.strip_prefix(DATA_DIR) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ if name.starts_with('/') => {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "InvalidPath",
                format!("the upload's filename {file_name:?} is outside {DATA_DIR}: use a relative name or a path under {DATA_DIR}"),
            )
            .with_target("filename"))
        }
        _ => name,
    };
    let name = name.trim_start_matches('/');
    if name.is_empty() || name.ends_with('/') {
        return Err(ApiError::validation(format!(
            "the upload's filename {file_name:?} does not name a file"
        ))
        .with_target("filename"));
    }
    Ok(match dir {
        Some(d) => format!("{d}/{name}"),
        None => name.to_string(),
    })
}

/// Streams one file part to the agent.
pub async fn stream_to_agent(
    field: multer::Field<'static>,
    client: &AgentClient,
    name: &str,
) -> Result<FileEntry, UploadFailure> {
    // Set when multer ends the stream for size, so the transport error the
    // agent call then reports is answered as 413, not as a sandbox failure.
    let too_large = Arc::new(AtomicBool::new(false));
    let broken: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let (tl, br) = (Arc::clone(&too_large), Arc::clone(&broken));
    let stream = field.map(move |chunk| {
        chunk.map_err(|e| {
            match &e {
                multer::Error::FieldSizeExceeded { .. }
                | multer::Error::StreamSizeExceeded { .. } => tl.store(true, Ordering::SeqCst),
                other => *br.lock().expect("upload lock") = Some(other.to_string()),
            }
            std::io::Error::other(e.to_string())
        })
    });
    let result = client.upload(name, stream).await;
    if too_large.load(Ordering::SeqCst) {
        return Err(UploadFailure::Api(ApiError::payload_too_large(
            MAX_UPLOAD_BYTES,
        )));
    }
    if let Some(msg) = broken.lock().expect("upload lock").take() {
        return Err(UploadFailure::Api(ApiError::validation(format!(
            "the upload body ended early or is malformed: {msg}"
        ))));
    }
    result.map_err(UploadFailure::Agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_bare_relative_and_absolute() {
        assert_eq!(target_name("data.csv", None).unwrap(), "data.csv");
        assert_eq!(target_name("sub/x.txt", None).unwrap(), "sub/x.txt");
        assert_eq!(target_name("/mnt/data/x.csv", None).unwrap(), "x.csv");
        assert_eq!(target_name("x.csv", Some("in")).unwrap(), "in/x.csv");
        // Absolute paths elsewhere are refused; `..` is the agent's to refuse.
        assert_eq!(
            target_name("/mnt/database", None).unwrap_err().code,
            "InvalidPath"
        );
        assert_eq!(
            target_name("/etc/evil.txt", None).unwrap_err().code,
            "InvalidPath"
        );
        assert!(target_name("", None).is_err());
        assert!(target_name("/mnt/data/", None).is_err());
    }

    fn headers(ct: &str, len: Option<u64>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        if let Some(l) = len {
            h.insert(header::CONTENT_LENGTH, l.into());
        }
        h
    }

    #[test]
    fn oversized_content_length_is_refused_before_reading() {
        let e = open(
            &headers(
                "multipart/form-data; boundary=X",
                Some(MAX_UPLOAD_BYTES + (2 << 20)),
            ),
            Body::empty(),
        )
        .err()
        .unwrap();
        assert_eq!(e.status, axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code, "PayloadTooLarge");
        let e = open(&headers("application/json", None), Body::empty())
            .err()
            .unwrap();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn oversized_chunked_part_is_refused_while_streaming() {
        // A streamed body with no Content-Length and a part one byte too big.
        let head =
            "--X\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n";
        let chunk = bytes::Bytes::from(vec![b'a'; 1 << 20]);
        let n = (MAX_UPLOAD_BYTES >> 20) as usize;
        let parts = std::iter::once(bytes::Bytes::from(head))
            .chain(std::iter::repeat_n(chunk, n))
            .chain(std::iter::once(bytes::Bytes::from("a\r\n--X--\r\n")))
            .map(Ok::<_, std::io::Error>);
        let body = Body::from_stream(futures_util::stream::iter(parts));
        let mut m = open(&headers("multipart/form-data; boundary=X", None), body).unwrap();
        let mut field = next_file(&mut m).await.unwrap().unwrap();
        let mut total = 0u64;
        let err = loop {
            match field.next().await {
                Some(Ok(c)) => total += c.len() as u64,
                Some(Err(e)) => break e,
                None => panic!("stream ended without the limit"),
            }
        };
        assert!(total <= MAX_UPLOAD_BYTES);
        assert_eq!(multer_error(err).code, "PayloadTooLarge");
    }

    #[tokio::test]
    async fn form_fields_without_filename_are_skipped() {
        let body = "--X\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--X\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nabc\r\n--X--\r\n";
        let mut m = open(
            &headers("multipart/form-data; boundary=X", None),
            Body::from(body),
        )
        .unwrap();
        let f = next_file(&mut m).await.unwrap().unwrap();
        assert_eq!(f.file_name(), Some("a.txt"));
        assert_eq!(f.text().await.unwrap(), "abc");
        assert!(next_file(&mut m).await.unwrap().is_none());
    }
}
