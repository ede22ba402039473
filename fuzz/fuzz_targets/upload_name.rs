//! Upload name sanitising (`agentd_core::service::sanitise_file_name`): whatever the client calls the file, the
//! stored name is one safe path component inside the session's upload directory.
#![no_main]

use std::path::{Component, Path};

use agentd_core::service::sanitise_file_name;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Multipart file names reach the server as strings; invalid UTF-8 is replaced first.
    let raw = String::from_utf8_lossy(data);
    let name = sanitise_file_name(&raw);
    assert!(!name.is_empty());
    assert!(name.chars().count() <= 100, "{name:?}");
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ' ')),
        "{name:?}"
    );
    assert!(!name.starts_with('.'), "{name:?}");
    let components: Vec<_> = Path::new(&name).components().collect();
    assert!(
        matches!(components.as_slice(), [Component::Normal(c)] if c.to_str() == Some(name.as_str())),
        "{name:?} is not one plain path component"
    );
    // A name that is already safe, short and not just dots and underscores is kept as it is.
    if !raw.is_empty()
        && raw.len() <= 100
        && raw.trim() == raw
        && !raw.starts_with('.')
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ' '))
        && !raw.chars().all(|c| c == '.' || c == '_')
    {
        assert_eq!(name, raw, "a safe name was changed");
    }
});
