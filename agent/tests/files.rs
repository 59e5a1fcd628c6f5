//! Files under the data directory through the real agent.

mod common;

use std::io::{Read, Write};

use common::{have, is_root, Agent};
use serde_json::json;
use sessiond_agent::proto::{FileEntry, MAX_UPLOAD_BYTES};

#[tokio::test]
async fn upload_list_download_stat_delete() {
    let a = Agent::start("files").await;
    let r = a
        .request("PUT", "/files/dir/sub/hello%20world.txt", "hello")
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let e: FileEntry = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((e.name.as_str(), e.size), ("dir/sub/hello world.txt", 5));
    assert!(e.last_modified.ends_with('Z') && e.last_modified.contains('T'));
    // Absolute names under /mnt/data are the same file.
    let r = a
        .request("PUT", "/files/%2Fmnt%2Fdata%2Ftop.bin", vec![0u8, 1, 2])
        .await;
    assert_eq!(r.status, 200);
    a.py("open('by-code.txt', 'w').write('from python')").await;
    let r = a.request("GET", "/files", "").await;
    let list: Vec<FileEntry> = serde_json::from_slice(&r.body).unwrap();
    let names: Vec<_> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["by-code.txt", "dir/sub/hello world.txt", "top.bin"]);
    let r = a
        .request("GET", "/files/dir/sub/hello%20world.txt", "")
        .await;
    assert_eq!((r.status.as_u16(), r.body.as_slice()), (200, &b"hello"[..]));
    let r = a.request("HEAD", "/files/top.bin", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], "3");
    assert!(r.body.is_empty());
    let r = a.request("GET", "/stat/by-code.txt", "").await;
    assert_eq!(r.json()["size"], json!(11));
    // Overwrite replaces the content.
    a.request("PUT", "/files/top.bin", "new").await;
    assert_eq!(a.request("GET", "/files/top.bin", "").await.body, b"new");
    let r = a.request("DELETE", "/files/top.bin", "").await;
    assert_eq!(r.status, 204);
    for (m, p) in [
        ("GET", "/files/top.bin"),
        ("DELETE", "/files/top.bin"),
        ("GET", "/stat/nope"),
    ] {
        let r = a.request(m, p, "").await;
        assert_eq!(r.status, 404, "{m} {p}");
        assert_eq!(r.json()["code"], json!("FileNotFound"));
    }
}

#[tokio::test]
async fn names_escaping_the_data_dir_are_refused() {
    let a = Agent::start("traversal").await;
    let outside = a.dir.0.join("secret.txt");
    std::fs::write(&outside, "secret").unwrap();
    a.py(&format!(
        "import os\nos.symlink({0:?}, 'link-abs')\nos.symlink('../secret.txt', 'link-rel')\nos.symlink('..', 'updir')\nos.symlink('/proc/self/root', 'magic')",
        outside.display().to_string()
    ))
    .await;
    let paths = [
        "/files/..%2Fsecret.txt",
        "/files/a%2F..%2F..%2Fsecret.txt",
        "/files/%2Fetc%2Fpasswd",
        "/files/link-abs",
        "/files/link-rel",
        "/files/updir%2Fsecret.txt",
        "/files/magic%2Fetc%2Fpasswd",
        "/stat/link-abs",
    ];
    for p in paths {
        let r = a.request("GET", p, "").await;
        assert_eq!(
            r.status,
            400,
            "GET {p}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], json!("InvalidPath"), "GET {p}");
    }
    for p in [
        "/files/updir%2Fplanted.txt",
        "/files/..%2Fplanted.txt",
        "/files/%2Ftmp%2Fplanted.txt",
    ] {
        let r = a.request("PUT", p, "x").await;
        assert_eq!(r.status, 400, "PUT {p}");
        assert_eq!(r.json()["code"], json!("InvalidPath"));
    }
    assert!(!a.dir.0.join("planted.txt").exists());
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret");
    // Symlinks are not listed, so nothing outside shows up.
    let list: Vec<FileEntry> =
        serde_json::from_slice(&a.request("GET", "/files", "").await.body).unwrap();
    assert!(list.is_empty(), "{list:?}");
}

#[tokio::test]
async fn oversized_upload_is_refused() {
    let a = Agent::start("oversized").await;
    // Only the headers: the agent must answer before reading the body.
    let mut s = std::os::unix::net::UnixStream::connect(&a.sock).unwrap();
    write!(
        s,
        "PUT /files/big HTTP/1.1\r\nhost: agent\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        MAX_UPLOAD_BYTES + 1
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("PayloadTooLarge"), "{reply}");
    assert!(!a.data().join("big").exists());
    assert_eq!(
        std::fs::read_dir(a.data()).unwrap().count(),
        0,
        "temporary file left behind"
    );
}

#[tokio::test]
async fn oversized_streamed_upload_is_refused_and_cleaned_up() {
    let a = Agent::start("oversized-chunked").await;
    // No length announced: the agent counts while streaming.
    let sock = a.sock.clone();
    let reply = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        write!(
            s,
            "PUT /files/big HTTP/1.1\r\nhost: agent\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        .unwrap();
        let chunk = vec![b'z'; 1024 * 1024];
        for _ in 0..=(MAX_UPLOAD_BYTES / chunk.len() as u64) {
            let sent = write!(s, "{:x}\r\n", chunk.len())
                .and_then(|_| s.write_all(&chunk))
                .and_then(|_| s.write_all(b"\r\n"));
            if sent.is_err() {
                break; // the agent answered and closed early
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    })
    .await
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("PayloadTooLarge"));
    assert_eq!(
        std::fs::read_dir(a.data()).unwrap().count(),
        0,
        "partial upload left behind"
    );
}

#[tokio::test]
async fn full_disk_is_reported() {
    if !is_root() || !have("unshare") {
        eprintln!("SKIP full_disk_is_reported: needs root and unshare to mount a small tmpfs");
        return;
    }
    // The agent runs in a private mount namespace with a 1 MiB tmpfs as its
    // data directory, like the jail's size-limited data dir.
    let a = Agent::start_with("nospace", |argv, dir| {
        let data = dir.join("data");
        let mut v = vec![
            "unshare".to_string(),
            "-m".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            "mount -t tmpfs -o size=1m tmpfs \"$0\" && exec \"$@\"".into(),
            data.display().to_string(),
        ];
        v.extend(argv);
        v
    })
    .await;
    let r = a
        .request("PUT", "/files/fill", vec![7u8; 2 * 1024 * 1024])
        .await;
    assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], json!("NoSpace"));
    let list: Vec<FileEntry> =
        serde_json::from_slice(&a.request("GET", "/files", "").await.body).unwrap();
    assert!(list.is_empty(), "partial upload left behind: {list:?}");
    // Space is back: a small upload works.
    assert_eq!(a.request("PUT", "/files/small", "ok").await.status, 200);
}
