//! Any `--config` model file, and any change from one to another: the input is two YAML
//! documents split at the first `---` line (one: a first apply). Each that reads is
//! applied as the agent applies a model (admission, encoding, the plan, every write
//! checked against the in-memory maps' consistency); reading must refuse, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::model::from_yaml;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let models: Vec<_> = text
        .splitn(2, "\n---\n")
        .filter_map(|doc| from_yaml(doc).ok())
        .collect();
    mesh_fuzz::through_the_planner(&models);
});
