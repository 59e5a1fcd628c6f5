//! Capped capture of a child's output stream.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Appended where output was cut at the cap.
pub const TRUNCATED_MARKER: &str = "\n[output truncated]\n";

/// Reads `reader` keeping the first `cap` bytes and draining the rest (so the
/// writer never blocks on a full pipe), until EOF or, once `stop` delivers a
/// deadline, until that deadline: a process the command left running in the
/// background may hold the pipe open forever.
pub async fn read_capped_until<R: AsyncRead + Unpin>(
    mut reader: R,
    cap: usize,
    mut stop: oneshot::Receiver<Instant>,
) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 16 * 1024];
    let mut deadline = None;
    loop {
        let read = match deadline {
            None => tokio::select! {
                r = reader.read(&mut buf) => r,
                d = &mut stop => {
                    deadline = Some(d.unwrap_or_else(|_| Instant::now()));
                    continue;
                }
            },
            Some(d) => match tokio::time::timeout_at(d, reader.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            },
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

/// Output as text for the JSON reply: invalid UTF-8 is replaced, and a cut
/// stream says so.
pub fn to_text(bytes: &[u8], truncated: bool) -> String {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    if truncated {
        s.push_str(TRUNCATED_MARKER);
    }
    s
}

/// An error and its sources on one line, `: `-separated, for logs and error
/// bodies (used by the daemon too). A source whose message the line already
/// holds is left out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_capped(data: &[u8], cap: usize) -> (Vec<u8>, bool) {
        // The sender stays alive: reading ends at EOF only.
        let (_stop, rx) = oneshot::channel();
        read_capped_until(data, cap, rx).await
    }

    #[tokio::test]
    async fn keeps_the_head_and_marks_the_cut() {
        let data = vec![b'x'; 100_000];
        let (kept, cut) = read_capped(&data[..], 10).await;
        assert_eq!(kept.len(), 10);
        assert!(cut);
        assert!(to_text(&kept, cut).ends_with("[output truncated]\n"));
        let (kept, cut) = read_capped(&b"abc"[..], 10).await;
        assert_eq!((kept.as_slice(), cut), (&b"abc"[..], false));
    }
}
