//! Uploads: what `POST /v1/sessions/{id}/files` stores, and where a tool result too long for the model is kept
//! whole ([`cut_tool_result`]).
//!
//! The store holds each upload, its record (the [`Upload`]) and its bytes, so a file id resolves on any node
//! sharing the store. The session's workspace holds the file itself, `<workspace>/<path>` (so file tools read
//! it by name), and a copy of its record, `<workspace>/.uploads/<id>.json`. A workspace that lacks the file
//! (another node's, a wiped one) gets it back from the store when the id is resolved ([`materialise`]) and
//! when a turn starts ([`materialise_all`]). Uploads made before the store held them exist only as workspace
//! records; they still resolve on the node that has them.

use std::collections::HashSet;
use std::io;
use std::path::Path;

use tokio::io::AsyncWriteExt;

use crate::domain::{new_id, Upload};
use crate::service::{numbered, sanitise_file_name};
use crate::store::{Store, StoreError};
use crate::tools::ToolOutput;

/// Stores `bytes` as an upload of session `session_id` (workspace `dir`) under a sanitised `file_name`,
/// numbered when the session already has an upload of that name or the workspace a file of that name (an
/// existing file is never overwritten): the file, then the store's record and bytes, then the workspace's copy
/// of the record.
pub async fn store(
    store: &dyn Store,
    session_id: &str,
    dir: &Path,
    file_name: &str,
    content_type: &str,
    bytes: &[u8],
) -> io::Result<Upload> {
    let taken: HashSet<String> = store
        .list_uploads(session_id)
        .await
        .map_err(io::Error::other)?
        .into_iter()
        .map(|u| u.path)
        .collect();
    tokio::fs::create_dir_all(dir).await?;
    let name = sanitise_file_name(file_name);
    let content_type = if content_type.is_empty() {
        "application/octet-stream".to_string()
    } else {
        content_type.to_string()
    };
    for n in 0..10_000 {
        let candidate = if n == 0 {
            name.clone()
        } else {
            numbered(&name, n)
        };
        if taken.contains(&candidate) {
            continue;
        }
        let path = dir.join(&candidate);
        let mut file = match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        let written = async {
            file.write_all(bytes).await?;
            file.flush().await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        let upload = Upload {
            id: new_id(),
            name: candidate.clone(),
            path: candidate,
            size: bytes.len() as u64,
            content_type: content_type.clone(),
        };
        match store.put_upload(session_id, &upload, bytes).await {
            Ok(()) => {}
            // Another node gave this name to an upload of the session meanwhile: take the next.
            Err(StoreError::Conflict(_)) => {
                let _ = tokio::fs::remove_file(&path).await;
                continue;
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(io::Error::other(e));
            }
        }
        write_record(dir, &upload).await;
        return Ok(upload);
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free name for `{name}` in the workspace"),
    ))
}

/// The upload `id` of a session: the store's record, or, for an upload made before the store held uploads, the
/// workspace's. The workspace is given the file (and its record) from the store when it lacks it, so file
/// tools find it. `Ok(None)` for an id the session does not have.
pub async fn resolve(
    store: &dyn Store,
    session_id: &str,
    dir: &Path,
    id: &str,
) -> io::Result<Option<Upload>> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Ok(None);
    }
    match store
        .get_upload(session_id, id)
        .await
        .map_err(io::Error::other)?
    {
        Some(upload) => {
            materialise(store, session_id, dir, &upload).await?;
            Ok(Some(upload))
        }
        None => {
            let legacy = dir.join(".uploads").join(format!("{id}.json"));
            match tokio::fs::read(&legacy).await {
                Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
                Err(_) => Ok(None),
            }
        }
    }
}

/// Gives the workspace every upload of the session it lacks (see [`materialise`]).
pub async fn materialise_all(store: &dyn Store, session_id: &str, dir: &Path) -> io::Result<()> {
    for upload in store
        .list_uploads(session_id)
        .await
        .map_err(io::Error::other)?
    {
        materialise(store, session_id, dir, &upload).await?;
    }
    Ok(())
}

/// Writes an upload's file (from the store's bytes) and its record into the workspace `dir` where they are
/// missing. Whatever is already at a name (a file, a link, anything) is left as it is; nothing is ever
/// followed: each file is written under a temporary name opened with `O_EXCL | O_NOFOLLOW` relative to the
/// directories opened before it, then linked to its name (which fails if the name exists), so a half-written
/// file is never seen under its name. A record whose path is not a plain sanitised file name is refused.
pub async fn materialise(
    store: &dyn Store,
    session_id: &str,
    dir: &Path,
    upload: &Upload,
) -> io::Result<()> {
    if upload.path != sanitise_file_name(&upload.path)
        || !upload.id.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("upload {} has an unsafe path", upload.id),
        ));
    }
    let path = dir.join(&upload.path);
    if tokio::fs::symlink_metadata(&path).await.is_err() {
        let bytes = store
            .read_upload(session_id, &upload.id)
            .await
            .map_err(io::Error::other)?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("upload {} has no bytes in the store", upload.id),
                )
            })?;
        let (dir, name, tag) = (dir.to_path_buf(), upload.path.clone(), upload.id.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            write_new(&dir, None, &name, &tag, &bytes)
        })
        .await
        .map_err(io::Error::other)??;
    }
    write_record(dir, upload).await;
    Ok(())
}

/// Puts the workspace's copy of an upload's record in place if it is missing. Only a convenience for whoever
/// looks at the folder (the store's record is the truth), so a failure is logged, not returned.
async fn write_record(dir: &Path, upload: &Upload) {
    let record = format!("{}.json", upload.id);
    if tokio::fs::symlink_metadata(dir.join(".uploads").join(&record))
        .await
        .is_ok()
    {
        return;
    }
    let written = match serde_json::to_vec(upload) {
        Ok(meta) => {
            let (dir, tag) = (dir.to_path_buf(), upload.id.clone());
            tokio::task::spawn_blocking(move || {
                write_new(&dir, Some(".uploads"), &record, &tag, &meta)
            })
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
        }
        Err(e) => Err(io::Error::other(e)),
    };
    if let Err(e) = written {
        tracing::warn!(upload = %upload.id, error = %e, "could not write an upload's record into the workspace");
    }
}

/// Writes `bytes` to `name` in `root` (or in its subdirectory `sub`, created if missing) unless `name` exists,
/// following no link (see [`materialise`]).
#[cfg(unix)]
fn write_new(
    root: &Path,
    sub: Option<&str>,
    name: &str,
    tag: &str,
    bytes: &[u8],
) -> io::Result<()> {
    use rustix::fs::{linkat, mkdirat, openat, unlinkat, AtFlags, Mode, OFlags, CWD};
    use rustix::io::Errno;
    use std::io::Write;

    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut dir = openat(CWD, root, dir_flags, Mode::empty())?;
    if let Some(sub) = sub {
        match mkdirat(&dir, sub, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        dir = openat(&dir, sub, dir_flags | OFlags::NOFOLLOW, Mode::empty())?;
    }
    let temp = format!(".{name}.{tag}.part");
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match openat(&dir, temp.as_str(), flags, Mode::from_raw_mode(0o644)) {
        Ok(fd) => fd,
        // A temporary file left by a crash: replace it (unlinking removes a link, never its target).
        Err(Errno::EXIST) => {
            unlinkat(&dir, temp.as_str(), AtFlags::empty())?;
            openat(&dir, temp.as_str(), flags, Mode::from_raw_mode(0o644))?
        }
        Err(e) => return Err(e.into()),
    };
    let mut file = std::fs::File::from(fd);
    let written = file.write_all(bytes).and_then(|()| file.flush());
    drop(file);
    let linked = written.and_then(|()| {
        match linkat(&dir, temp.as_str(), &dir, name, AtFlags::empty()) {
            // Someone else put something there meanwhile: it stays.
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    });
    let _ = unlinkat(&dir, temp.as_str(), AtFlags::empty());
    linked
}

/// Where Unix's `openat` is missing: create the file only if absent (not link-safe).
#[cfg(not(unix))]
fn write_new(
    root: &Path,
    sub: Option<&str>,
    name: &str,
    _tag: &str,
    bytes: &[u8],
) -> io::Result<()> {
    use std::io::Write;
    let dir = match sub {
        Some(s) => root.join(s),
        None => root.to_path_buf(),
    };
    std::fs::create_dir_all(&dir)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(name))
    {
        Ok(mut f) => f.write_all(bytes),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Bounds a tool result to `max` bytes (SPEC.md section 4): a longer one is cut on a character boundary and a
/// note says how much was cut and names the upload (of `session_id`, in `keep_in` and `workspace`) that keeps the
/// whole result. If the upload
/// cannot be written the note says so; the result is cut all the same.
pub async fn cut_tool_result(
    out: ToolOutput,
    max: usize,
    keep_in: &dyn Store,
    session_id: &str,
    workspace: &Path,
    call_id: &str,
    tool: &str,
) -> ToolOutput {
    let total = out.content.len();
    if total <= max {
        return out;
    }
    // Ids come from the model: only their plain characters make the name (a `/` must not pick a directory).
    let plain = |s: &str| -> String {
        s.chars()
            .take(48)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let file_name = format!("tool-result-{}-{}.txt", plain(tool), plain(call_id));
    let kept = match store(
        keep_in,
        session_id,
        workspace,
        &file_name,
        "text/plain",
        out.content.as_bytes(),
    )
    .await
    {
        Ok(up) => format!(
            "the whole result is the session's upload `{}` (file id `{}`, {} bytes)",
            up.path, up.id, up.size
        ),
        Err(e) => {
            tracing::warn!(error = %e, tool, "could not keep a long tool result as an upload");
            format!("the whole result could not be kept: {e}")
        }
    };
    let mut head = out.content;
    let mut end = max;
    while !head.is_char_boundary(end) {
        end -= 1;
    }
    head.truncate(end);
    let cut = total - end;
    head.push_str(&format!(
        "\n\n[tool result cut: {cut} of {total} bytes not shown (the first {end} are above); {kept}]"
    ));
    ToolOutput {
        content: head,
        success: out.success,
        images: out.images,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{now_rfc3339, Session, SessionStatus};
    use crate::memory::MemoryStore;

    async fn store_with_session() -> (MemoryStore, String) {
        let store = MemoryStore::default();
        let now = now_rfc3339();
        let session = Session {
            id: new_id(),
            agent: "a".into(),
            title: None,
            status: SessionStatus::Active,
            metadata: serde_json::json!({}),
            created_at: now.clone(),
            updated_at: now,
            active_run_id: None,
            principal: "p".into(),
        };
        store.create_session(&session).await.unwrap();
        (store, session.id)
    }

    #[tokio::test]
    async fn a_long_result_is_cut_with_a_note_and_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (st, sid) = store_with_session().await;
        let cut = |out: ToolOutput, max: usize, call: &'static str| {
            let (st, sid, dir) = (&st, sid.clone(), dir.path().to_path_buf());
            async move { cut_tool_result(out, max, st, &sid, &dir, call, "t").await }
        };
        let short = cut(ToolOutput::ok("short"), 1024, "c1").await;
        assert_eq!(short.content, "short");
        // Multi-byte characters straddle the limit: the cut stays on a boundary.
        let long: String = "é".repeat(3000);
        let out = cut(ToolOutput::ok(long.clone()), 1025, "c/2").await;
        assert!(out.success);
        let (head, note) = out.content.split_once("\n\n[tool result cut: ").unwrap();
        assert_eq!(head, "é".repeat(512));
        assert!(note.starts_with("4976 of 6000 bytes not shown"), "{note}");
        let id = note
            .split("file id `")
            .nth(1)
            .unwrap()
            .split('`')
            .next()
            .unwrap();
        let meta: Upload = serde_json::from_slice(
            &std::fs::read(dir.path().join(".uploads").join(format!("{id}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(meta.path, "tool-result-t-c_2.txt");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(&meta.path)).unwrap(),
            long
        );
        // The store has it too, record and bytes.
        assert_eq!(st.get_upload(&sid, id).await.unwrap(), Some(meta.clone()));
        assert_eq!(
            st.read_upload(&sid, id).await.unwrap().unwrap(),
            long.as_bytes()
        );
        // The same call id again does not overwrite the first upload.
        let again = cut(ToolOutput::err("x".repeat(2000)), 1024, "c/2").await;
        assert!(!again.success);
        assert!(
            again.content.contains("tool-result-t-c_2-1.txt"),
            "{}",
            again.content
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(&meta.path)).unwrap(),
            long
        );
    }

    #[tokio::test]
    async fn a_name_another_node_used_is_not_reused_and_a_missing_file_comes_back() {
        let (st, sid) = store_with_session().await;
        let node_a = tempfile::tempdir().unwrap();
        let node_b = tempfile::tempdir().unwrap();
        let a = store(
            &st,
            &sid,
            node_a.path(),
            "notes.txt",
            "text/plain",
            b"from a",
        )
        .await
        .unwrap();
        // Node B's workspace has no notes.txt, but the session has: B numbers its upload.
        let b = store(&st, &sid, node_b.path(), "notes.txt", "", b"from b")
            .await
            .unwrap();
        assert_eq!(a.path, "notes.txt");
        assert_eq!(b.path, "notes-1.txt");
        assert_eq!(b.content_type, "application/octet-stream");
        // A's id resolves on B: the file and its record appear in B's workspace.
        let got = resolve(&st, &sid, node_b.path(), &a.id).await.unwrap();
        assert_eq!(got, Some(a.clone()));
        assert_eq!(
            std::fs::read(node_b.path().join("notes.txt")).unwrap(),
            b"from a"
        );
        assert!(node_b
            .path()
            .join(".uploads")
            .join(format!("{}.json", a.id))
            .is_file());
        // Nothing is left under a temporary name.
        let names: Vec<String> = std::fs::read_dir(node_b.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
        // Unknown and malformed ids resolve to nothing.
        assert_eq!(
            resolve(&st, &sid, node_b.path(), "nope").await.unwrap(),
            None
        );
        assert_eq!(
            resolve(&st, &sid, node_b.path(), "../x").await.unwrap(),
            None
        );
        // A wiped workspace gets every upload back at once.
        std::fs::remove_dir_all(node_a.path().join(".uploads")).unwrap();
        std::fs::remove_file(node_a.path().join("notes.txt")).unwrap();
        materialise_all(&st, &sid, node_a.path()).await.unwrap();
        assert_eq!(
            std::fs::read(node_a.path().join("notes.txt")).unwrap(),
            b"from a"
        );
        assert_eq!(
            std::fs::read(node_a.path().join("notes-1.txt")).unwrap(),
            b"from b"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn materialising_follows_no_link_and_overwrites_nothing() {
        let (st, sid) = store_with_session().await;
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let up = store(&st, &sid, ws.path(), "a.txt", "text/plain", b"mine")
            .await
            .unwrap();
        // The file is replaced by a link to a file outside, and the record folder by a link to a folder outside.
        std::fs::remove_file(ws.path().join("a.txt")).unwrap();
        std::fs::write(outside.path().join("target"), b"outside").unwrap();
        std::os::unix::fs::symlink(outside.path().join("target"), ws.path().join("a.txt")).unwrap();
        std::fs::remove_dir_all(ws.path().join(".uploads")).unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.path().join(".uploads")).unwrap();
        // The link at the file's name stays as it is (read_file refuses it); nothing goes into the linked folder.
        assert_eq!(
            resolve(&st, &sid, ws.path(), &up.id).await.unwrap(),
            Some(up.clone())
        );
        assert_eq!(
            std::fs::read(outside.path().join("target")).unwrap(),
            b"outside"
        );
        let outside_names: Vec<_> = std::fs::read_dir(outside.path()).unwrap().collect();
        assert_eq!(outside_names.len(), 1, "nothing was written outside");
        // With the link gone, the file comes back from the store.
        std::fs::remove_file(ws.path().join("a.txt")).unwrap();
        resolve(&st, &sid, ws.path(), &up.id).await.unwrap();
        assert_eq!(std::fs::read(ws.path().join("a.txt")).unwrap(), b"mine");
        // A record with a path that is not a plain name is refused.
        let mut bad = up.clone();
        bad.path = "../escape.txt".into();
        assert!(materialise(&st, &sid, ws.path(), &bad).await.is_err());
    }
}
