//! The GRUB environment block (`grubenv`), read and written the way GRUB's
//! own `grub-editenv` and `save_env` do, so the bootloader sees exactly what
//! the agent wrote.
//!
//! The block is a fixed 1024 bytes because GRUB overwrites it in place
//! without allocating: it must never grow or shrink. Layout:
//!
//! ```text
//! # GRUB Environment Block\n
//! name=value\n            (zero or more)
//! ####...                 (padding up to 1024 bytes)
//! ```
//!
//! In values a backslash and a newline are each written preceded by a
//! backslash (a newline stays a real newline byte, not the letter `n`); that
//! is what GRUB's `envblk.c` does, and reading undoes it. Lines starting with
//! `#` are comments; GRUB skips them and so do we, and they are not written
//! back (the header and the padding are regenerated).

use std::fmt;

use crate::error::BootEnvError;

/// Size of every GRUB environment block, in bytes.
pub const GRUBENV_SIZE: usize = 1024;

const HEADER: &[u8] = b"# GRUB Environment Block\n";

/// The variables of a GRUB environment block, in file order.
///
/// Keys this project does not know (set by GRUB scripts or an operator) are
/// kept with their position, so rewriting the block never loses or reorders
/// someone else's state.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

impl fmt::Debug for GrubEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl GrubEnv {
    /// An empty environment, as `grub-editenv FILE create` makes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a whole block.
    ///
    /// Stricter than GRUB where GRUB would silently misread: a line that is
    /// neither a comment nor `name=value`, a variable set twice, a NUL byte
    /// or invalid UTF-8 are errors rather than guesses. Never panics, on any
    /// input.
    pub fn parse(bytes: &[u8]) -> Result<Self, BootEnvError> {
        if bytes.len() != GRUBENV_SIZE {
            return Err(BootEnvError::WrongSize {
                len: bytes.len() as u64,
            });
        }
        if !bytes.starts_with(HEADER) {
            return Err(BootEnvError::MissingHeader);
        }
        let malformed = |offset, reason| Err(BootEnvError::Malformed { offset, reason });

        let mut env = GrubEnv::new();
        let mut p = HEADER.len();
        while p < bytes.len() {
            if bytes[p] == b'#' {
                p = next_line(bytes, p);
                continue;
            }

            let line_start = p;
            let eq = loop {
                match bytes.get(p) {
                    None => {
                        return malformed(line_start, "the last line has no '=' and no newline")
                    }
                    Some(b'=') => break p,
                    Some(b'\n') => {
                        return malformed(line_start, "line is neither a comment nor name=value")
                    }
                    Some(0) => return malformed(p, "NUL byte in a variable name"),
                    Some(_) => p += 1,
                }
            };
            if eq == line_start {
                return malformed(line_start, "variable with an empty name");
            }
            let Ok(name) = std::str::from_utf8(&bytes[line_start..eq]) else {
                return malformed(line_start, "variable name is not valid UTF-8");
            };

            p = eq + 1;
            let mut value = Vec::new();
            loop {
                match bytes.get(p) {
                    None => {
                        return malformed(line_start, "the last variable has no closing newline")
                    }
                    Some(b'\n') => {
                        p += 1;
                        break;
                    }
                    Some(b'\\') => match bytes.get(p + 1) {
                        None => return malformed(p, "the block ends inside a backslash escape"),
                        Some(0) => return malformed(p + 1, "NUL byte in a value"),
                        Some(&c) => {
                            value.push(c);
                            p += 2;
                        }
                    },
                    Some(0) => return malformed(p, "NUL byte in a value"),
                    Some(&c) => {
                        value.push(c);
                        p += 1;
                    }
                }
            }
            let Ok(value) = String::from_utf8(value) else {
                return malformed(eq + 1, "value is not valid UTF-8");
            };

            if env.get(name).is_some() {
                return Err(BootEnvError::DuplicateVariable {
                    name: name.to_owned(),
                });
            }
            env.vars.push((name.to_owned(), value));
        }
        Ok(env)
    }

    /// Serializes into a full block, padded with `#`.
    pub fn to_bytes(&self) -> Result<[u8; GRUBENV_SIZE], BootEnvError> {
        let needed = self.encoded_len();
        if needed > GRUBENV_SIZE {
            return Err(BootEnvError::TooLarge { needed });
        }
        let mut out = [b'#'; GRUBENV_SIZE];
        let mut w = Writer {
            buf: &mut out,
            pos: 0,
        };
        w.put(HEADER);
        for (name, value) in &self.vars {
            w.put(name.as_bytes());
            w.put(b"=");
            for &c in value.as_bytes() {
                if c == b'\\' || c == b'\n' {
                    w.put(b"\\");
                }
                w.put(&[c]);
            }
            w.put(b"\n");
        }
        debug_assert_eq!(w.pos, needed);
        Ok(out)
    }

    /// Bytes the variables take in a block, header included; the block
    /// fits while this is at most [`GRUBENV_SIZE`].
    pub fn encoded_len(&self) -> usize {
        let vars: usize = self
            .vars
            .iter()
            .map(|(name, value)| {
                let escapes = value.bytes().filter(|&c| c == b'\\' || c == b'\n').count();
                name.len() + 1 + value.len() + escapes + 1
            })
            .sum();
        HEADER.len() + vars
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a variable: in place if it exists (like `grub-editenv set`),
    /// else appended at the end.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), BootEnvError> {
        check_name(name)?;
        if value.contains('\0') {
            return Err(BootEnvError::InvalidValue {
                name: name.to_owned(),
                reason: "must not contain a NUL byte (GRUB would cut the value there)",
            });
        }
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_owned(),
            None => self.vars.push((name.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    /// Removes a variable, returning its value if it was set.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.vars.iter().position(|(n, _)| n == name)?;
        Some(self.vars.remove(i).1)
    }

    /// The variables as `(name, value)`, in block order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.vars.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

/// Where GRUB resumes scanning after a comment line: a backslash hides the
/// byte after it even there, so a comment ends only at an unescaped newline.
fn next_line(bytes: &[u8], mut p: usize) -> usize {
    while p < bytes.len() {
        match bytes[p] {
            b'\\' => p += 2,
            b'\n' => return p + 1,
            _ => p += 1,
        }
    }
    bytes.len()
}

fn check_name(name: &str) -> Result<(), BootEnvError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.contains(['=', '\n', '\0']) {
        "must not contain '=', a newline or a NUL byte"
    } else if name.starts_with('#') {
        "must not start with '#' (GRUB would read the line as a comment)"
    } else {
        return Ok(());
    };
    Err(BootEnvError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

/// Appends into the fixed block; the caller has checked the total length,
/// so running past the end is a bug in `encoded_len`, not bad input.
struct Writer<'a> {
    buf: &'a mut [u8; GRUBENV_SIZE],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(body: &[u8]) -> Vec<u8> {
        let mut b = HEADER.to_vec();
        b.extend_from_slice(body);
        b.resize(GRUBENV_SIZE, b'#');
        b
    }

    #[test]
    fn empty_env_is_header_and_padding() {
        let bytes = GrubEnv::new().to_bytes().unwrap();
        assert_eq!(bytes.to_vec(), block(b""));
        assert_eq!(GrubEnv::parse(&bytes).unwrap(), GrubEnv::new());
    }

    #[test]
    fn writes_vars_in_order_and_round_trips() {
        let mut env = GrubEnv::new();
        env.set("saved_entry", "0").unwrap();
        env.set("uplift_default", "a").unwrap();
        env.set("saved_entry", "1").unwrap();
        let bytes = env.to_bytes().unwrap();
        assert_eq!(bytes.to_vec(), block(b"saved_entry=1\nuplift_default=a\n"));
        let back = GrubEnv::parse(&bytes).unwrap();
        assert_eq!(back, env);
        let names: Vec<_> = back.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["saved_entry", "uplift_default"]);
    }

    #[test]
    fn escapes_backslash_and_newline_like_grub() {
        let mut env = GrubEnv::new();
        env.set("x", "a\\b").unwrap();
        env.set("y", "l1\nl2").unwrap();
        env.set("z", "").unwrap();
        let bytes = env.to_bytes().unwrap();
        // Byte for byte what grub-editenv 2.06 writes for the same values.
        assert_eq!(bytes.to_vec(), block(b"x=a\\\\b\ny=l1\\\nl2\nz=\n"));
        assert_eq!(GrubEnv::parse(&bytes).unwrap(), env);
    }

    #[test]
    fn escaped_letter_reads_as_the_letter() {
        // GRUB drops the backslash before any byte, so "\n" written by hand
        // is the letter n, not a newline.
        let env = GrubEnv::parse(&block(b"v=a\\nb\n")).unwrap();
        assert_eq!(env.get("v"), Some("anb"));
    }

    #[test]
    fn skips_comment_lines_including_grub_editenv_warning() {
        let body = b"# WARNING: Do not edit this file by tools other than grub-editenv!!!\nk=v\n# note \\\n still comment\nk2=v2\n";
        let env = GrubEnv::parse(&block(body)).unwrap();
        assert_eq!(env.iter().collect::<Vec<_>>(), [("k", "v"), ("k2", "v2")]);
    }

    #[test]
    fn exact_fit_is_accepted_and_one_more_byte_is_too_large() {
        let mut env = GrubEnv::new();
        let room = GRUBENV_SIZE - HEADER.len() - "k=\n".len();
        env.set("k", &"v".repeat(room)).unwrap();
        assert_eq!(env.encoded_len(), GRUBENV_SIZE);
        let bytes = env.to_bytes().unwrap();
        assert_eq!(bytes[GRUBENV_SIZE - 1], b'\n');
        assert_eq!(GrubEnv::parse(&bytes).unwrap(), env);

        // An escaped byte counts twice.
        env.set("k", &format!("{}\\", "v".repeat(room - 1)))
            .unwrap();
        match env.to_bytes() {
            Err(BootEnvError::TooLarge { needed }) => assert_eq!(needed, GRUBENV_SIZE + 1),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn invalid_names_and_values_are_refused() {
        let mut env = GrubEnv::new();
        for bad in ["", "a=b", "a\nb", "a\0b", "#x"] {
            assert!(
                matches!(env.set(bad, "v"), Err(BootEnvError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            env.set("k", "a\0b"),
            Err(BootEnvError::InvalidValue { .. })
        ));
        assert!(env.is_empty());
    }

    #[test]
    fn remove_keeps_the_order_of_the_rest() {
        let mut env = GrubEnv::new();
        for n in ["a", "b", "c"] {
            env.set(n, n).unwrap();
        }
        assert_eq!(env.remove("b").as_deref(), Some("b"));
        assert_eq!(env.remove("b"), None);
        assert_eq!(env.iter().collect::<Vec<_>>(), [("a", "a"), ("c", "c")]);
        assert_eq!(env.len(), 2);
    }

    #[test]
    fn wrong_size_and_missing_header_are_reported() {
        assert!(matches!(
            GrubEnv::parse(b"# GRUB Environment Block\n"),
            Err(BootEnvError::WrongSize { len: 25 })
        ));
        assert!(matches!(
            GrubEnv::parse(&[b'#'; GRUBENV_SIZE]),
            Err(BootEnvError::MissingHeader)
        ));
    }

    #[test]
    fn malformed_blocks_are_reported_not_guessed() {
        let cases: &[(&[u8], &str)] = &[
            (b"novalue\n", "neither a comment"),
            (b"\nk=v\n", "neither a comment"),
            (b"=v\n", "empty name"),
            (b"k=v\0\n", "NUL"),
            (b"k\0=v\n", "NUL"),
            (b"k=\xff\n", "UTF-8"),
            (b"\xff=v\n", "UTF-8"),
            (b"k=1\nk=2\n", "more than once"),
        ];
        for (body, want) in cases {
            let err = GrubEnv::parse(&block(body)).unwrap_err().to_string();
            assert!(err.contains(want), "{body:?}: {err}");
        }
    }

    #[test]
    fn unterminated_last_line_is_malformed() {
        // No padding left for a closing newline.
        let mut b = HEADER.to_vec();
        b.extend_from_slice(b"k=");
        b.resize(GRUBENV_SIZE - 1, b'v');
        b.push(b'\\');
        let err = GrubEnv::parse(&b).unwrap_err().to_string();
        assert!(err.contains("backslash escape"), "{err}");

        let mut b = HEADER.to_vec();
        b.resize(GRUBENV_SIZE, b'k');
        let err = GrubEnv::parse(&b).unwrap_err().to_string();
        assert!(err.contains("no '='"), "{err}");

        let mut b = HEADER.to_vec();
        b.extend_from_slice(b"k=");
        b.resize(GRUBENV_SIZE, b'v');
        let err = GrubEnv::parse(&b).unwrap_err().to_string();
        assert!(err.contains("no closing newline"), "{err}");
    }

    /// A cheap stand-in for the fuzzer: random and mutated blocks must give
    /// `Ok` or `Err`, never a panic, and whatever parses must round-trip.
    #[test]
    fn parse_never_panics_on_mutated_input() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut base = GrubEnv::new();
        base.set("uplift_default", "a").unwrap();
        base.set("path", "C:\\x\ny").unwrap();
        let base = base.to_bytes().unwrap();
        let alphabet = b"#=\\\n\0ab\xff";
        for _ in 0..20_000 {
            let mut b = base.to_vec();
            for _ in 0..(rand() % 8) {
                let i = (rand() as usize) % b.len();
                b[i] = alphabet[(rand() as usize) % alphabet.len()];
            }
            if rand() % 50 == 0 {
                b.truncate((rand() as usize) % b.len());
            }
            if let Ok(env) = GrubEnv::parse(&b) {
                if let Ok(out) = env.to_bytes() {
                    assert_eq!(GrubEnv::parse(&out).unwrap(), env);
                }
            }
        }
    }
}
