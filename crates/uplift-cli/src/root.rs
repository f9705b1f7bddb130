//! `uplift root`: the key ceremony for the root of trust. Root and release
//! keys stay offline; these commands run on the key holders' machines and
//! pass a root file from one to the next:
//!
//! 1. `uplift root init` writes version 1 (who may sign releases, who may
//!    sign the next root, thresholds, expiry), unsigned;
//! 2. `uplift root next` writes version N+1 from N with the keys changed;
//! 3. each root key holder runs `uplift root sign --key` on their machine
//!    (a new root needs a threshold of the previous root's root keys and of
//!    its own);
//! 4. `uplift root publish` sends it to the server, which checks it and
//!    serves it to devices; devices check the whole chain again.

use crate::cli::{print_as, ServerArgs};
use crate::output::table;
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use uplift_proto::trust::RootView;
use uplift_release::keys::{read_public_key_file, ReleasePublicKey, ReleaseSigningKey};
use uplift_release::root::{Role, Root, SignedRoot, ROOT_FORMAT};

#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// Write the first root (version 1), unsigned: ship it in the device
    /// image once signed (`trusted_root` in the agent config).
    Init {
        #[command(flatten)]
        roles: RoleArgs,
        /// Days until the root expires; devices refuse releases under an
        /// expired root until a newer one is published.
        #[arg(long, default_value_t = 365)]
        valid_days: i64,
        /// File to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the next root (version N+1) from root N: roles not named keep
    /// their keys and thresholds. Unsigned: have it signed by a threshold
    /// of the old and of the new root keys.
    Next {
        /// The current root (version N).
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        roles: RoleArgs,
        #[arg(long, default_value_t = 365)]
        valid_days: i64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add one signature to a root file, in place (each key holder signs on
    /// their own machine, in turn).
    Sign {
        /// The root file to sign.
        file: PathBuf,
        /// A root key (`uplift keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The root it follows, to say how many of its keys have signed.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
    /// What a root file says and who has signed it.
    Show {
        file: PathBuf,
        #[arg(long)]
        previous: Option<PathBuf>,
    },
    /// Send a signed root to the server, which serves it to devices (admin).
    Publish {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The roots published on the server.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Keys and thresholds of the roles; a key is `ed25519:<base64>` or a
/// `.pub` file from `uplift keygen`.
#[derive(Debug, Args)]
pub struct RoleArgs {
    /// A key that may sign the next root (repeat for each).
    #[arg(long = "root-key", value_name = "KEY")]
    root_keys: Vec<String>,
    /// How many root keys must sign the next root.
    #[arg(long)]
    root_threshold: Option<u32>,
    /// A key that may sign releases (repeat for each).
    #[arg(long = "release-key", value_name = "KEY")]
    release_keys: Vec<String>,
    /// How many release keys must sign a release.
    #[arg(long)]
    release_threshold: Option<u32>,
    /// The server's online key that signs each offer's freshness
    /// (`[trust] freshness_key`; repeat for several servers' keys). Named,
    /// devices refuse offers without current signed freshness.
    #[arg(long = "freshness-key", value_name = "KEY")]
    freshness_keys: Vec<String>,
    /// How many freshness keys must sign an offer's freshness.
    #[arg(long)]
    freshness_threshold: Option<u32>,
    /// Drop the freshness role (devices then accept offers without it).
    #[arg(long, conflicts_with = "freshness_keys")]
    no_freshness: bool,
}

impl RoleArgs {
    /// The freshness role: given keys, else the old role (with a new
    /// threshold if given), else none.
    fn freshness(&self, old: Option<&Role>) -> anyhow::Result<Option<Role>> {
        if self.no_freshness || (self.freshness_keys.is_empty() && old.is_none()) {
            return Ok(None);
        }
        role(old, &self.freshness_keys, self.freshness_threshold).map(Some)
    }
}

fn public_key(text: &str) -> anyhow::Result<ReleasePublicKey> {
    if text.starts_with("ed25519:") {
        Ok(text.parse()?)
    } else {
        Ok(read_public_key_file(Path::new(text))?)
    }
}

/// `keys` (if any given) with `threshold` (else the old one, else 1),
/// replacing `old`.
fn role(old: Option<&Role>, keys: &[String], threshold: Option<u32>) -> anyhow::Result<Role> {
    let keys = if keys.is_empty() {
        old.map(|r| r.keys.clone()).unwrap_or_default()
    } else {
        keys.iter()
            .map(|k| public_key(k))
            .collect::<anyhow::Result<_>>()?
    };
    let threshold = threshold.or(old.map(|r| r.threshold)).unwrap_or(1);
    Ok(Role { keys, threshold })
}

fn expiry(valid_days: i64) -> anyhow::Result<String> {
    anyhow::ensure!(valid_days > 0, "--valid-days must be at least 1");
    let at = time::OffsetDateTime::now_utc() + time::Duration::days(valid_days);
    Ok(at
        .replace_nanosecond(0)?
        .format(&time::format_description::well_known::Rfc3339)?)
}

fn read(path: &Path) -> anyhow::Result<SignedRoot> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    SignedRoot::from_json(&bytes).with_context(|| format!("{}", path.display()))
}

fn write_new(path: &Path, root: &SignedRoot) -> anyhow::Result<()> {
    uplift_files::create_file(path, &root.to_json(), uplift_files::Access::Public).with_context(
        || {
            format!(
                "writing {} (an existing file is never replaced)",
                path.display()
            )
        },
    )
}

/// Who has signed, against the thresholds it needs.
fn progress(signed: &SignedRoot, previous: Option<&SignedRoot>) -> anyhow::Result<String> {
    let root = signed.parse_unverified()?;
    let mut out = format!(
        "root version {} (expires {}): signed by {} of its {} root keys, {} needed",
        root.version,
        root.expires_at,
        signed.valid_signatures(&root.root),
        root.root.keys.len(),
        root.root.threshold
    );
    if let Some(previous) = previous {
        let old = previous.parse_unverified()?;
        out.push_str(&format!(
            "; by {} of version {}'s {} root keys, {} needed",
            signed.valid_signatures(&old.root),
            old.version,
            old.root.keys.len(),
            old.root.threshold
        ));
    } else if root.version > 1 {
        out.push_str("; give --previous to count the previous root's keys too");
    }
    Ok(out)
}

fn describe(root: &Root) -> String {
    let ids = |r: &Role| {
        r.keys
            .iter()
            .map(ReleasePublicKey::key_id)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let freshness = match &root.freshness {
        Some(role) => format!(
            "freshness keys ({} of them must sign each offer): {}",
            role.threshold,
            ids(role)
        ),
        None => "no freshness role: offers need no signed freshness".to_owned(),
    };
    format!(
        "root keys ({} of them must sign the next root): {}\nrelease keys ({} of them must sign a release): {}\n{freshness}",
        root.root.threshold,
        ids(&root.root),
        root.release.threshold,
        ids(&root.release),
    )
}

pub async fn root(cmd: RootCommand) -> anyhow::Result<i32> {
    match cmd {
        RootCommand::Init {
            roles,
            valid_days,
            out,
        } => {
            anyhow::ensure!(
                !roles.root_keys.is_empty() && !roles.release_keys.is_empty(),
                "a first root needs --root-key and --release-key (repeat each for several keys)"
            );
            let root = Root {
                format: ROOT_FORMAT,
                version: 1,
                expires_at: expiry(valid_days)?,
                root: role(None, &roles.root_keys, roles.root_threshold)?,
                release: role(None, &roles.release_keys, roles.release_threshold)?,
                freshness: roles.freshness(None)?,
            };
            let signed = root.sign(&[])?;
            write_new(&out, &signed)?;
            println!("{}\n{}", describe(&root), progress(&signed, None)?);
            println!(
                "next: each root key holder runs `uplift root sign --key <their key> {}`",
                out.display()
            );
            Ok(0)
        }
        RootCommand::Next {
            from,
            roles,
            valid_days,
            out,
        } => {
            let previous = read(&from)?;
            let old = previous.parse_unverified()?;
            let root = Root {
                format: ROOT_FORMAT,
                version: old.version + 1,
                expires_at: expiry(valid_days)?,
                root: role(Some(&old.root), &roles.root_keys, roles.root_threshold)?,
                release: role(
                    Some(&old.release),
                    &roles.release_keys,
                    roles.release_threshold,
                )?,
                freshness: roles.freshness(old.freshness.as_ref())?,
            };
            let signed = root.sign(&[])?;
            write_new(&out, &signed)?;
            println!(
                "{}\n{}",
                describe(&root),
                progress(&signed, Some(&previous))?
            );
            println!(
                "next: a threshold of version {}'s root keys and of this root's own sign it \
                 (`uplift root sign --key <key> --previous {} {}`)",
                old.version,
                from.display(),
                out.display()
            );
            Ok(0)
        }
        RootCommand::Sign {
            file,
            key,
            previous,
        } => {
            let mut signed = read(&file)?;
            let key = ReleaseSigningKey::read_from_file(&key)?;
            signed.add_signature(&key);
            uplift_files::replace_file(&file, &signed.to_json(), uplift_files::Access::Public)
                .with_context(|| format!("writing {}", file.display()))?;
            let previous = previous.as_deref().map(read).transpose()?;
            println!(
                "signed with key {}\n{}",
                key.public_key().key_id(),
                progress(&signed, previous.as_ref())?
            );
            Ok(0)
        }
        RootCommand::Show { file, previous } => {
            let signed = read(&file)?;
            let previous = previous.as_deref().map(read).transpose()?;
            println!(
                "{}\n{}",
                describe(&signed.parse_unverified()?),
                progress(&signed, previous.as_ref())?
            );
            Ok(0)
        }
        RootCommand::Publish { file, json, server } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let view = server.client()?.publish_root(bytes).await?;
            print_as(json, &view, |v| {
                format!(
                    "published root version {} (expires {}); devices take it before their next install",
                    v.version, v.expires_at
                )
            })?;
            Ok(0)
        }
        RootCommand::List { json, server } => {
            let roots = server.client()?.roots().await?;
            print_as(json, &roots, |roots: &Vec<RootView>| {
                let rows: Vec<Vec<String>> = roots
                    .iter()
                    .map(|r| {
                        vec![
                            r.version.to_string(),
                            r.expires_at.clone(),
                            format!("{}/{}", r.root_threshold, r.root_keys.len()),
                            format!("{}/{}", r.release_threshold, r.release_keys.len()),
                            r.published_at.clone(),
                            r.published_by.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["VERSION", "EXPIRES", "ROOT", "RELEASE", "PUBLISHED", "BY"],
                    &rows,
                )
            })?;
            Ok(0)
        }
    }
}
