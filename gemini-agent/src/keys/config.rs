//! The key pool's configuration: keys, per-project budgets, and the keys file.
//!
//! The application's settings (`GEMINI_API_KEYS`, `GEMINI_API_KEYS_FILE`, `GEMINI_RPM`,
//! `GEMINI_RPD`, `GEMINI_TPM`) map onto [`PoolConfig`]: the list format through
//! [`parse_key_list`], the file through [`KeysFile::parse`], the three numbers onto
//! [`PoolConfig::defaults`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// One Gemini API key and the Google Cloud project it belongs to. Keys of one project
/// share that project's budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolKey {
    /// A name for logs, events and the admin view; the key itself is never shown.
    pub label: String,
    /// The API key.
    pub key: SecretString,
    /// The project whose quota the key spends.
    pub project: String,
}

impl PoolKey {
    /// A key of `project`.
    pub fn new(
        label: impl Into<String>,
        key: impl Into<String>,
        project: impl Into<String>,
    ) -> Self {
        Self {
            label: label.into(),
            key: SecretString::from(key.into()),
            project: project.into(),
        }
    }
}

/// One project's request budget. Google changes free-tier limits often, so these are
/// configuration, and the pool also learns lower limits from Gemini's 429 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Requests per minute.
    pub rpm: u32,
    /// Requests per US Pacific day.
    pub rpd: u32,
    /// Input tokens per minute; `None` leaves tokens unchecked.
    pub tpm: Option<u32>,
}

impl Default for Budget {
    /// gemini-2.5-flash's free tier in late 2025: 10 requests per minute, 250 per day.
    fn default() -> Self {
        Self {
            rpm: 10,
            rpd: 250,
            tpm: None,
        }
    }
}

impl Budget {
    /// This budget with the fields `with` sets replaced.
    pub fn overridden(self, with: &BudgetOverride) -> Self {
        Self {
            rpm: with.rpm.unwrap_or(self.rpm),
            rpd: with.rpd.unwrap_or(self.rpd),
            tpm: with.tpm.or(self.tpm),
        }
    }
}

/// Some of a [`Budget`]'s fields, to override the defaults for one project.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetOverride {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Requests per US Pacific day.
    #[serde(default)]
    pub rpd: Option<u32>,
    /// Input tokens per minute.
    #[serde(default)]
    pub tpm: Option<u32>,
}

/// Everything a [`KeyPool`](super::KeyPool) needs to know before it starts.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The keys, in the order ties are broken when choosing one.
    pub keys: Vec<PoolKey>,
    /// The budget of every project not overridden.
    pub defaults: Budget,
    /// Per-project overrides of [`Self::defaults`].
    pub projects: BTreeMap<String, BudgetOverride>,
    /// How long a project cools after a per-minute 429 that carries no retry delay.
    pub default_cooldown: Duration,
    /// How long a quota learned from a 429 applies before the configured one is tried again.
    pub learned_quota_ttl: Duration,
}

impl PoolConfig {
    /// `keys` with the default budget, a 60-second default cooldown and learned quotas
    /// kept for a day.
    pub fn new(keys: Vec<PoolKey>) -> Self {
        Self {
            keys,
            defaults: Budget::default(),
            projects: BTreeMap::new(),
            default_cooldown: Duration::from_secs(60),
            learned_quota_ttl: Duration::from_secs(24 * 3600),
        }
    }

    /// Adds a keys file: its keys after the ones already here, its `[defaults]` over
    /// [`Self::defaults`], its `[projects.<name>]` tables over any earlier overrides.
    pub fn merge_file(&mut self, file: KeysFile) {
        self.keys.extend(file.keys);
        self.defaults = self.defaults.overridden(&file.defaults);
        for (project, with) in file.projects {
            let slot = self.projects.entry(project).or_default();
            *slot = BudgetOverride {
                rpm: with.rpm.or(slot.rpm),
                rpd: with.rpd.or(slot.rpd),
                tpm: with.tpm.or(slot.tpm),
            };
        }
    }

    /// The budget `project` is configured with.
    pub fn budget_for(&self, project: &str) -> Budget {
        match self.projects.get(project) {
            Some(with) => self.defaults.overridden(with),
            None => self.defaults,
        }
    }

    /// Checks what would otherwise surprise later: empty or repeated labels, empty
    /// projects or keys, zero budgets, overrides for projects no key belongs to (a typo).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut labels = BTreeSet::new();
        for (n, key) in self.keys.iter().enumerate() {
            if key.label.trim().is_empty()
                || key.project.trim().is_empty()
                || key.key.expose_secret().trim().is_empty()
            {
                return Err(ConfigError::IncompleteKey { entry: n + 1 });
            }
            if !labels.insert(key.label.as_str()) {
                return Err(ConfigError::DuplicateLabel(key.label.clone()));
            }
        }
        let projects: BTreeSet<&str> = self.keys.iter().map(|k| k.project.as_str()).collect();
        for name in self.projects.keys() {
            if !projects.contains(name.as_str()) {
                return Err(ConfigError::UnknownProject(name.clone()));
            }
        }
        let budgets = std::iter::once(("defaults", self.defaults)).chain(
            self.projects
                .keys()
                .map(|name| (name.as_str(), self.budget_for(name))),
        );
        for (project, budget) in budgets {
            let zero = [
                ("rpm", Some(budget.rpm)),
                ("rpd", Some(budget.rpd)),
                ("tpm", budget.tpm),
            ]
            .into_iter()
            .find(|(_, value)| *value == Some(0));
            if let Some((field, _)) = zero {
                return Err(ConfigError::ZeroBudget {
                    project: project.to_owned(),
                    field,
                });
            }
        }
        Ok(())
    }
}

/// The keys file (`GEMINI_API_KEYS_FILE`), in TOML:
///
/// ```toml
/// # Optional: the budget of every project (else GEMINI_RPM / GEMINI_RPD / GEMINI_TPM).
/// [defaults]
/// rpm = 10
/// rpd = 250
/// tpm = 250000
///
/// [[keys]]
/// label = "alpha-1"
/// key = "AIza…"
/// project = "alpha"
///
/// [[keys]]
/// label = "beta-1"
/// key = "AIza…"
/// project = "beta"
///
/// # Optional: overrides for one project (any of rpm, rpd, tpm).
/// [projects.beta]
/// rpm = 15
/// ```
///
/// TOML because the file sits next to the TOML config file and takes comments. Unknown
/// fields are errors, so a misspelt `rmp` does not silently fall back to a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// Overrides of the default budget.
    #[serde(default)]
    pub defaults: BudgetOverride,
    /// The keys.
    #[serde(default)]
    pub keys: Vec<PoolKey>,
    /// Per-project overrides, by project name.
    #[serde(default)]
    pub projects: BTreeMap<String, BudgetOverride>,
}

impl KeysFile {
    /// Parses the file's text. Errors give the line and never quote the text, which
    /// holds keys.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::File {
            message: e.message().to_owned(),
            line: e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1),
        })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            message: format!("cannot read {}: {e}", path.display()),
            line: None,
        })?;
        Self::parse(&text)
    }
}

/// Parses the `GEMINI_API_KEYS` list: `label=key@project` entries separated by commas or
/// new lines; blank entries and `#` comments are skipped. The project is after the last
/// `@`; spaces around each part are dropped. Errors name the entry by number and never quote it.
pub fn parse_key_list(text: &str) -> Result<Vec<PoolKey>, ConfigError> {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty() && !entry.starts_with('#'))
        .enumerate()
        .map(|(n, entry)| {
            entry
                .split_once('=')
                .and_then(|(label, rest)| {
                    let (key, project) = rest.rsplit_once('@')?;
                    let (label, key, project) = (label.trim(), key.trim(), project.trim());
                    (!label.is_empty() && !key.is_empty() && !project.is_empty())
                        .then(|| PoolKey::new(label, key, project))
                })
                .ok_or(ConfigError::Entry { entry: n + 1 })
        })
        .collect()
}

/// A configuration mistake, named precisely enough to fix without showing any key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The keys file cannot be read or parsed.
    #[error("keys file: {message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    File {
        /// What is wrong.
        message: String,
        /// Where, when known.
        line: Option<usize>,
    },
    /// A key list entry is not `label=key@project`.
    #[error("key list entry {entry} is not of the form label=key@project")]
    Entry {
        /// The entry's number, from 1.
        entry: usize,
    },
    /// A key lacks its label, key or project.
    #[error("key {entry} needs a non-empty label, key and project")]
    IncompleteKey {
        /// The key's number, from 1.
        entry: usize,
    },
    /// Two keys share a label, so logs and the admin view could not tell them apart.
    #[error("key label {0:?} is used more than once")]
    DuplicateLabel(String),
    /// An override names a project that has no key.
    #[error("[projects.{0}] overrides a project that no key belongs to")]
    UnknownProject(String),
    /// A zero budget would never admit a call.
    #[error("{project}: {field} must be at least 1")]
    ZeroBudget {
        /// The project, or `defaults`.
        project: String,
        /// The field.
        field: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[defaults]
rpm = 5

[[keys]]
label = "a1"
key = "AIzaSECRET-a1"
project = "alpha"

[[keys]]
label = "b1"
key = "AIzaSECRET-b1"
project = "beta"

[projects.beta]
rpm = 15
tpm = 1000
"#;

    #[test]
    fn the_keys_file_sets_keys_defaults_and_project_overrides() {
        let mut config = PoolConfig::new(Vec::new());
        config.merge_file(KeysFile::parse(FILE).unwrap());
        config.validate().unwrap();
        assert_eq!(config.keys.len(), 2);
        assert_eq!(config.keys[1].key.expose_secret(), "AIzaSECRET-b1");
        assert_eq!(
            config.budget_for("alpha"),
            Budget {
                rpm: 5,
                rpd: 250,
                tpm: None
            }
        );
        assert_eq!(
            config.budget_for("beta"),
            Budget {
                rpm: 15,
                rpd: 250,
                tpm: Some(1000)
            }
        );
    }

    #[test]
    fn keys_file_errors_give_the_line_but_never_the_key() {
        let text = "[[keys]]\nlabel = \"a\"\nkey = \"AIzaSECRET\"\nproject = \"p\"\nsecret = \"AIzaSECRET\"\n";
        let error = KeysFile::parse(text).unwrap_err();
        let shown = error.to_string();
        assert!(!shown.contains("AIzaSECRET"), "{shown}");
        assert!(shown.contains("unknown field"), "{shown}");
        let ConfigError::File { line, .. } = error else {
            panic!("{error:?}")
        };
        assert!(line.is_some_and(|l| (1..=5).contains(&l)), "{line:?}");
    }

    #[test]
    fn a_misspelt_budget_field_is_an_error() {
        assert!(KeysFile::parse("[projects.alpha]\nrmp = 3\n").is_err());
    }

    #[test]
    fn the_key_list_splits_on_the_last_at_sign() {
        let keys = parse_key_list("a1=AIza@x@alpha, b1 = k2@beta\n# comment\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].label, "a1");
        assert_eq!(keys[0].key.expose_secret(), "AIza@x");
        assert_eq!(keys[0].project, "alpha");
        assert_eq!(keys[1].label, "b1");
        assert_eq!(keys[1].key.expose_secret(), "k2");
        let error = parse_key_list("a1=AIzaSECRET").unwrap_err();
        assert_eq!(error, ConfigError::Entry { entry: 1 });
        assert!(!error.to_string().contains("AIzaSECRET"));
    }

    #[test]
    fn validation_catches_repeated_labels_unknown_projects_and_zero_budgets() {
        let keys = vec![PoolKey::new("a", "k1", "p"), PoolKey::new("a", "k2", "p")];
        assert_eq!(
            PoolConfig::new(keys).validate(),
            Err(ConfigError::DuplicateLabel("a".into()))
        );

        let mut config = PoolConfig::new(vec![PoolKey::new("a", "k1", "p")]);
        config
            .projects
            .insert("q".into(), BudgetOverride::default());
        assert_eq!(
            config.validate(),
            Err(ConfigError::UnknownProject("q".into()))
        );

        let mut config = PoolConfig::new(vec![PoolKey::new("a", "k1", "p")]);
        config.projects.insert(
            "p".into(),
            BudgetOverride {
                rpd: Some(0),
                ..Default::default()
            },
        );
        assert_eq!(
            config.validate(),
            Err(ConfigError::ZeroBudget {
                project: "p".into(),
                field: "rpd"
            })
        );
    }
}
