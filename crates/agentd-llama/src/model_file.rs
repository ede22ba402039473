//! Checking and loading a GGUF file, with every failure reported as one line naming the file and the cause.
//!
//! llama.cpp's own diagnostics go to its log callback, which we disable (it would write to stderr), and its load
//! function only says "null". So the common causes are checked up front, in Rust, where the message can be
//! precise: the file is missing, unreadable, or does not start with the GGUF magic. Whatever llama.cpp still
//! rejects after that (truncated, corrupt tensors, unknown architecture) is reported as "failed to load".

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::{send_logs_to_tracing, LogOptions};

/// Every GGUF file starts with these four bytes.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// llama.cpp's process-wide backend. It may be initialised only once per process, so every loaded model
/// shares this one, and it is never torn down.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The backend, initialised on first use with llama.cpp's logging disabled.
pub(crate) fn backend() -> Result<&'static LlamaBackend, String> {
    BACKEND
        .get_or_init(|| {
            // Before init, so nothing llama.cpp or ggml says during start-up reaches stderr either.
            send_logs_to_tracing(LogOptions::default().with_logs_enabled(false));
            LlamaBackend::init().map_err(|e| format!("cannot start llama.cpp: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Checks that `path` looks like a GGUF file we can read. The error is the cause only; the caller adds the path.
fn check_file(path: &Path) -> Result<(), String> {
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("file not found".to_string())
        }
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    if !metadata.is_file() {
        return Err("not a regular file".to_string());
    }
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == GGUF_MAGIC => Ok(()),
        Ok(()) => Err("not a GGUF file (wrong magic bytes)".to_string()),
        Err(_) => Err(format!(
            "not a GGUF file (only {} bytes long)",
            metadata.len()
        )),
    }
}

/// Loads the model at `path` (CPU only, memory-mapped).
pub(crate) fn load_model(path: &Path) -> Result<LlamaModel, String> {
    let fail = |cause: String| format!("cannot load model {}: {cause}", path.display());
    check_file(path).map_err(fail)?;
    let backend = backend().map_err(fail)?;
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).map_err(|e| {
        fail(match e {
            llama_cpp_2::LlamaModelLoadError::NullResult => {
                "llama.cpp failed to load it (corrupt, truncated, or an unsupported model architecture)".to_string()
            }
            other => format!("llama.cpp failed to load it: {other}"),
        })
    })
}
