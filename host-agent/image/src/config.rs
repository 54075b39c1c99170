//! What the guest needs to start an agent in an image: the process part of an OCI image config
//! (`Env`, `WorkingDir`, `User`, `Entrypoint`, `Cmd`), stored as `config.json` beside the disk.
//!
//! The field names are the OCI ones, so the same type reads the `config` object of an OCI or
//! docker image config and writes the store's `config.json`. OCI writers may put `null` where a
//! list or string is absent; that reads as empty.

use serde::{Deserialize, Deserializer, Serialize};

/// The process settings of an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `NAME=value` pairs.
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    /// The working directory; empty means `/`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    #[serde(default, deserialize_with = "null_as_default")]
    pub user: String,
    /// The entrypoint argv.
    #[serde(default, deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    /// The default arguments (or argv, when there is no entrypoint).
    #[serde(default, deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_oci_fields_with_nulls_and_extras() {
        let json = r#"{"Env":["PATH=/bin"],"WorkingDir":null,"User":"1000:1000",
            "Entrypoint":null,"Cmd":["sh"],"ExposedPorts":{"80/tcp":{}}}"#;
        let c: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.env, ["PATH=/bin"]);
        assert_eq!(c.working_dir, "");
        assert_eq!(c.user, "1000:1000");
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.cmd, ["sh"]);
        let back: ImageConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
