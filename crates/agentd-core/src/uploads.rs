//! Files stored in a session's workspace as uploads: what `POST /v1/sessions/{id}/files` stores, and where a
//! tool result too long for the model is kept whole ([`cut_tool_result`]).
//!
//! An upload is the file itself, `<workspace>/<name>` (so file tools read it by name), plus its record
//! `<workspace>/.uploads/<id>.json` (the [`Upload`]), which is how a file id is resolved.

use std::io;
use std::path::Path;

use tokio::io::AsyncWriteExt;

use crate::domain::new_id;
use crate::service::{numbered, sanitise_file_name, Upload};
use crate::tools::ToolOutput;

/// Stores `bytes` as an upload of the workspace `dir` under a sanitised `file_name` (numbered when the name is
/// taken; an existing file is never overwritten).
pub async fn store(
    dir: &Path,
    file_name: &str,
    content_type: &str,
    bytes: &[u8],
) -> io::Result<Upload> {
    let meta_dir = dir.join(".uploads");
    tokio::fs::create_dir_all(&meta_dir).await?;
    let name = sanitise_file_name(file_name);
    let mut stored = name.clone();
    let mut n = 1;
    let mut file = loop {
        match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(&stored))
            .await
        {
            Ok(f) => break f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => {
                stored = numbered(&name, n);
                n += 1;
            }
            Err(e) => return Err(e),
        }
    };
    file.write_all(bytes).await?;
    file.flush().await?;
    let upload = Upload {
        id: new_id(),
        name: stored.clone(),
        path: stored,
        size: bytes.len() as u64,
        content_type: if content_type.is_empty() {
            "application/octet-stream".into()
        } else {
            content_type.to_string()
        },
    };
    let meta = serde_json::to_vec(&upload).map_err(io::Error::other)?;
    tokio::fs::write(meta_dir.join(format!("{}.json", upload.id)), meta).await?;
    Ok(upload)
}

/// Bounds a tool result to `max` bytes (SPEC.md section 4): a longer one is cut on a character boundary and a
/// note says how much was cut and names the upload (in `workspace`) that keeps the whole result. If the upload
/// cannot be written the note says so; the result is cut all the same.
pub async fn cut_tool_result(
    out: ToolOutput,
    max: usize,
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
    let kept = match store(workspace, &file_name, "text/plain", out.content.as_bytes()).await {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_long_result_is_cut_with_a_note_and_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let short = cut_tool_result(ToolOutput::ok("short"), 1024, dir.path(), "c1", "t").await;
        assert_eq!(short.content, "short");
        // Multi-byte characters straddle the limit: the cut stays on a boundary.
        let long: String = "é".repeat(3000);
        let out = cut_tool_result(ToolOutput::ok(long.clone()), 1025, dir.path(), "c/2", "t").await;
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
        // The same call id again does not overwrite the first upload.
        let again = cut_tool_result(
            ToolOutput::err("x".repeat(2000)),
            1024,
            dir.path(),
            "c/2",
            "t",
        )
        .await;
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
}
