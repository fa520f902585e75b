//! The agent's optional settings file: YAML whose keys are the agent's long flags
//! (`interface: eth1`, `data-path-port: 4790`, `xdp: native`). Precedence: command line,
//! then environment (`MESH_*`), then this file, then the built-in defaults. The file's
//! values are handed to the flag parser as the flags' environment variables where those
//! are unset, so every value goes through the same parsing and checks as a flag. Pure.

use std::collections::BTreeMap;

/// Default location, read when it exists.
pub const DEFAULT_PATH: &str = "/etc/mesh/agent.yaml";

/// The (environment variable, value) pairs the settings `text` stands for, given the
/// flags that can be set (long name -> environment variable). Unknown keys, and values
/// that are not a single scalar, are errors naming the key.
pub fn to_env(
    text: &str,
    flags: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, String> {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let map = match doc {
        serde_yaml_ng::Value::Null => return Ok(Vec::new()),
        serde_yaml_ng::Value::Mapping(m) => m,
        _ => return Err("expected `flag: value` lines".into()),
    };
    let mut out = Vec::new();
    for (k, v) in map {
        let key = k.as_str().ok_or("keys are flag names")?.to_string();
        let env = flags.get(&key).ok_or_else(|| {
            format!(
                "unknown key `{key}` (keys are the long flags: {})",
                flags.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        let value = match v {
            serde_yaml_ng::Value::String(s) => s,
            serde_yaml_ng::Value::Number(n) => n.to_string(),
            serde_yaml_ng::Value::Bool(b) => b.to_string(),
            _ => return Err(format!("`{key}`: expected a single value")),
        };
        out.push((env.clone(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("interface".into(), "MESH_INTERFACE".into()),
            ("data-path-port".into(), "MESH_DATA_PATH_PORT".into()),
            ("from-docker".into(), "MESH_FROM_DOCKER".into()),
        ])
    }

    #[test]
    fn keys_become_the_flags_environment() {
        let env = to_env(
            "interface: eth1\ndata-path-port: 4790\nfrom-docker: true\n",
            &flags(),
        )
        .unwrap();
        assert_eq!(
            env,
            vec![
                ("MESH_INTERFACE".into(), "eth1".into()),
                ("MESH_DATA_PATH_PORT".into(), "4790".into()),
                ("MESH_FROM_DOCKER".into(), "true".into()),
            ]
        );
        assert_eq!(to_env("", &flags()).unwrap(), vec![]);
        assert_eq!(to_env("# nothing\n", &flags()).unwrap(), vec![]);
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = to_env("interfce: eth1\n", &flags()).unwrap_err();
        assert!(
            e.contains("unknown key `interfce`") && e.contains("interface"),
            "{e}"
        );
        let e = to_env("interface: [a, b]\n", &flags()).unwrap_err();
        assert!(e.contains("`interface`: expected a single value"), "{e}");
        assert!(to_env("- a\n", &flags()).is_err());
    }
}
