//! The U-Boot environment, read and written byte for byte the way U-Boot's
//! `saveenv` and Debian's `fw_printenv` / `fw_setenv` (libubootenv) do, so
//! the bootloader sees exactly what the agent wrote.
//!
//! An environment is stored in one copy or, for power-cut safety, in two
//! (`CONFIG_SYS_REDUNDAND_ENVIRONMENT`). Each copy has the size configured
//! in U-Boot (`CONFIG_ENV_SIZE`, the third column of `fw_env.config`):
//!
//! ```text
//! single:     CRC32 (4 bytes, little-endian) | data
//! redundant:  CRC32 (4 bytes, little-endian) | flag (1 byte) | data
//! data:       name=value\0 name=value\0 ... \0   then 0x00 up to the end
//! ```
//!
//! The CRC (zlib's CRC-32) covers the whole data area, padding included, so
//! a copy torn by a power cut is detected. The flag says which of two valid
//! copies is the newer: on files and block devices (what Uplift supports)
//! both U-Boot and libubootenv use an *incrementing* counter, where the copy
//! with the larger flag wins, 0 beats 255 (the counter wrapped), and equal
//! flags pick the first copy. (The boolean active/obsolete scheme is for raw
//! NOR flash, which needs erase handling Uplift does not do.)
//!
//! Variables are written sorted by name, as both U-Boot (`hexport_r`) and
//! libubootenv do, so an environment the agent writes is the one
//! `fw_setenv` would have written for the same variables.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::BootEnvError;

/// Bytes of the CRC32 at the start of every copy.
pub const CRC_LEN: usize = 4;

/// How the environment is stored: in one copy, or in two with a flag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Single,
    Redundant,
}

impl Layout {
    /// Bytes before the data area of each copy.
    pub fn header_len(self) -> usize {
        match self {
            Layout::Single => CRC_LEN,
            Layout::Redundant => CRC_LEN + 1,
        }
    }
}

/// The variables of a U-Boot environment, sorted by name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UBootEnv {
    vars: BTreeMap<String, String>,
}

impl fmt::Debug for UBootEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Where a data area is malformed: the offset in the data area and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    pub at: usize,
    pub reason: String,
}

impl UBootEnv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a data area (a copy without its CRC and flag byte).
    ///
    /// Stricter than U-Boot where U-Boot would silently misread: an entry
    /// without `=`, an empty name, a variable set twice, invalid UTF-8 or a
    /// list that runs off the end are errors. `name=` (an empty value) is
    /// read as unset, as U-Boot's `himport_r` does. Never panics.
    pub fn parse_data(data: &[u8]) -> Result<Self, DataError> {
        let err = |at, reason: &str| {
            Err(DataError {
                at,
                reason: reason.to_owned(),
            })
        };
        let mut env = UBootEnv::new();
        let mut p = 0;
        loop {
            match data.get(p) {
                None => return err(p, "the variable list has no terminating empty entry"),
                // An empty entry ends the list; what follows is padding.
                Some(0) => return Ok(env),
                Some(_) => {}
            }
            let Some(len) = data[p..].iter().position(|&c| c == 0) else {
                return err(p, "the last variable runs to the end of the environment");
            };
            let entry = &data[p..p + len];
            let Some(eq) = entry.iter().position(|&c| c == b'=') else {
                return err(p, "entry has no '=' (it is not name=value)");
            };
            if eq == 0 {
                return err(p, "variable with an empty name");
            }
            let Ok(name) = std::str::from_utf8(&entry[..eq]) else {
                return err(p, "variable name is not valid UTF-8");
            };
            let Ok(value) = std::str::from_utf8(&entry[eq + 1..]) else {
                return err(p + eq + 1, "value is not valid UTF-8");
            };
            if env.vars.contains_key(name) {
                return err(p, &format!("variable {name:?} is set more than once"));
            }
            if !value.is_empty() {
                env.vars.insert(name.to_owned(), value.to_owned());
            }
            p += len + 1;
        }
    }

    /// The data area of `len` bytes holding the variables, padded with
    /// zeros as U-Boot pads it.
    pub fn encode_data(&self, len: usize) -> Result<Vec<u8>, BootEnvError> {
        let needed = self.encoded_len();
        if needed > len {
            return Err(BootEnvError::UBootTooLarge {
                needed,
                capacity: len,
            });
        }
        let mut out = Vec::with_capacity(len);
        for (name, value) in &self.vars {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        }
        out.resize(len, 0);
        Ok(out)
    }

    /// Bytes the variables take in a data area, the closing empty entry
    /// included.
    pub fn encoded_len(&self) -> usize {
        let vars: usize = self
            .vars
            .iter()
            .map(|(name, value)| name.len() + 1 + value.len() + 1)
            .sum();
        vars + 1
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Sets a variable, as `fw_setenv name value` does.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), BootEnvError> {
        let reason = if name.is_empty() {
            Some("must not be empty")
        } else if name.contains(['=', '\0']) {
            Some("must not contain '=' or a NUL byte")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(BootEnvError::InvalidName {
                name: name.to_owned(),
                reason,
            });
        }
        let reason = if value.is_empty() {
            Some("must not be empty (U-Boot reads an empty value as unset; remove the variable instead)")
        } else if value.contains('\0') {
            Some("must not contain a NUL byte (it ends a U-Boot variable)")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(BootEnvError::InvalidValue {
                name: name.to_owned(),
                reason,
            });
        }
        self.vars.insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    /// Removes a variable, returning its value if it was set.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.vars.remove(name)
    }

    /// The variables as `(name, value)`, sorted by name.
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

/// One copy, checked: its variables and, in the redundant layout, its flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedCopy {
    pub env: UBootEnv,
    pub flag: u8,
}

/// Encodes a whole copy of `size` bytes: CRC, flag byte (redundant layout
/// only) and data.
pub fn encode_copy(
    env: &UBootEnv,
    layout: Layout,
    size: usize,
    flag: u8,
) -> Result<Vec<u8>, BootEnvError> {
    let header = layout.header_len();
    let data = env.encode_data(size.saturating_sub(header))?;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
    if layout == Layout::Redundant {
        out.push(flag);
    }
    out.extend_from_slice(&data);
    Ok(out)
}

/// Checks and parses one copy as read from the device. `copy` (1 or 2) and
/// `offset` only go into the error, to say which copy is bad.
pub fn decode_copy(
    bytes: &[u8],
    layout: Layout,
    copy: u8,
    offset: u64,
) -> Result<DecodedCopy, BootEnvError> {
    let header = layout.header_len();
    if bytes.len() <= header {
        return Err(BootEnvError::UBootConfig {
            reason: format!(
                "an environment copy of {} bytes has no room for data after its {header}-byte header",
                bytes.len()
            ),
        });
    }
    let data = &bytes[header..];
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(BootEnvError::UBootBadCrc {
            copy,
            offset,
            stored,
            computed,
            redundant: layout == Layout::Redundant,
        });
    }
    let flag = match layout {
        Layout::Single => 0,
        Layout::Redundant => bytes[CRC_LEN],
    };
    let env = UBootEnv::parse_data(data).map_err(|e| BootEnvError::UBootMalformed {
        copy,
        offset,
        at: e.at,
        reason: e.reason,
    })?;
    Ok(DecodedCopy { env, flag })
}

/// Which of two copies is current, by the rules U-Boot
/// (`env_import_redund`) and libubootenv share for incrementing flags:
/// only a valid copy can win; of two valid copies the larger flag wins,
/// except that 0 beats 255 (the counter wrapped); equal flags pick the
/// first. `None` when neither copy is valid.
pub fn current_copy(flags: [Option<u8>; 2]) -> Option<usize> {
    match flags {
        [None, None] => None,
        [Some(_), None] => Some(0),
        [None, Some(_)] => Some(1),
        [Some(255), Some(0)] => Some(1),
        [Some(0), Some(255)] => Some(0),
        [Some(a), Some(b)] => Some(if b > a { 1 } else { 0 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> UBootEnv {
        let mut env = UBootEnv::new();
        for (k, v) in vars {
            env.set(k, v).unwrap();
        }
        env
    }

    #[test]
    fn encodes_sorted_nul_separated_and_zero_padded() {
        let e = env(&[("foo", "bar"), ("abc", "1")]);
        let data = e.encode_data(32).unwrap();
        let mut want = b"abc=1\0foo=bar\0".to_vec();
        want.resize(32, 0);
        assert_eq!(data, want);
        assert_eq!(UBootEnv::parse_data(&data).unwrap(), e);
    }

    #[test]
    fn copy_matches_what_fw_setenv_wrote() {
        // `fw_setenv foo bar; fw_setenv abc 1` on a 4 KiB single-copy
        // environment (libubootenv 0.3.2): the first 20 bytes of the file,
        // then zeros to the end.
        let mut want = vec![
            0x8c, 0xc3, 0xc0, 0xe6, b'a', b'b', b'c', b'=', b'1', 0, b'f', b'o', b'o', b'=', b'b',
            b'a', b'r', 0,
        ];
        want.resize(4096, 0);
        let e = env(&[("foo", "bar"), ("abc", "1")]);
        assert_eq!(encode_copy(&e, Layout::Single, 4096, 0).unwrap(), want);
        let back = decode_copy(&want, Layout::Single, 1, 0).unwrap();
        assert_eq!(back, DecodedCopy { env: e, flag: 0 });
    }

    #[test]
    fn redundant_copy_has_the_flag_after_the_crc() {
        let e = env(&[("foo", "1")]);
        let bytes = encode_copy(&e, Layout::Redundant, 4096, 1).unwrap();
        // As fw_setenv wrote it into the second copy of a blank file.
        assert_eq!(&bytes[..11], b"\x85\x84\xba\xb8\x01foo=1\0");
        assert_eq!(bytes.len(), 4096);
        let back = decode_copy(&bytes, Layout::Redundant, 2, 4096).unwrap();
        assert_eq!(back.flag, 1);
        assert_eq!(back.env, e);
    }

    #[test]
    fn empty_env_is_a_single_empty_entry() {
        let data = UBootEnv::new().encode_data(8).unwrap();
        assert_eq!(data, [0; 8]);
        assert_eq!(UBootEnv::parse_data(&data).unwrap(), UBootEnv::new());
    }

    #[test]
    fn exact_fit_is_accepted_and_one_more_byte_is_too_large() {
        let mut e = env(&[("k", "vvvv")]);
        // k=vvvv\0 plus the closing \0.
        assert_eq!(e.encoded_len(), 8);
        assert_eq!(e.encode_data(8).unwrap(), b"k=vvvv\0\0");
        e.set("k", "vvvvv").unwrap();
        match e.encode_data(8) {
            Err(BootEnvError::UBootTooLarge { needed, capacity }) => {
                assert_eq!((needed, capacity), (9, 8))
            }
            other => panic!("expected UBootTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn bad_crc_names_the_copy_the_offset_and_both_crcs() {
        let mut bytes = encode_copy(&env(&[("a", "b")]), Layout::Redundant, 64, 7).unwrap();
        let written = crc32fast::hash(&bytes[5..]);
        bytes[10] ^= 1;
        let err = decode_copy(&bytes, Layout::Redundant, 2, 0x2000).unwrap_err();
        let msg = err.to_string();
        let BootEnvError::UBootBadCrc {
            copy,
            offset,
            stored,
            computed,
            redundant,
        } = err
        else {
            panic!("expected UBootBadCrc, got {err:?}");
        };
        assert_eq!((copy, offset, redundant), (2, 0x2000, true));
        assert_eq!(stored, written);
        assert_eq!(computed, crc32fast::hash(&bytes[5..]));
        assert!(
            msg.contains("copy 2") && msg.contains("0x2000") && msg.contains("other copy"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_data_is_reported_with_its_offset() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"novalue\0\0", 0, "no '='"),
            (b"a=1\0=v\0\0", 4, "empty name"),
            (b"a=1\0a=2\0\0", 4, "more than once"),
            (b"a=\xff\0\0", 2, "UTF-8"),
            (b"\xff=1\0\0", 0, "UTF-8"),
            (b"a=1\0bbbb", 4, "runs to the end"),
            (b"a=1\0", 4, "no terminating"),
        ];
        for (data, at, want) in cases {
            let e = UBootEnv::parse_data(data).unwrap_err();
            assert_eq!(e.at, *at, "{data:?}: {e:?}");
            assert!(e.reason.contains(want), "{data:?}: {e:?}");
        }
    }

    #[test]
    fn empty_value_reads_as_unset_and_cannot_be_written() {
        let e = UBootEnv::parse_data(b"a=\0b=1\0\0").unwrap();
        assert_eq!(e, env(&[("b", "1")]));
        let mut e = UBootEnv::new();
        assert!(matches!(
            e.set("a", ""),
            Err(BootEnvError::InvalidValue { .. })
        ));
        for bad in ["", "a=b", "a\0"] {
            assert!(matches!(
                e.set(bad, "v"),
                Err(BootEnvError::InvalidName { .. })
            ));
        }
        assert!(e.is_empty());
    }

    #[test]
    fn newest_valid_copy_wins_as_in_libubootenv() {
        assert_eq!(current_copy([None, None]), None);
        assert_eq!(current_copy([Some(9), None]), Some(0));
        assert_eq!(current_copy([None, Some(0)]), Some(1));
        assert_eq!(current_copy([Some(1), Some(2)]), Some(1));
        assert_eq!(current_copy([Some(3), Some(2)]), Some(0));
        assert_eq!(current_copy([Some(5), Some(5)]), Some(0));
        // The counter wrapped.
        assert_eq!(current_copy([Some(255), Some(0)]), Some(1));
        assert_eq!(current_copy([Some(0), Some(255)]), Some(0));
        assert_eq!(current_copy([Some(254), Some(255)]), Some(1));
    }

    /// Random and mutated copies give `Ok` or `Err`, never a panic.
    #[test]
    fn decode_never_panics_on_mutated_input() {
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = env(&[("uplift_default", "a"), ("bootcmd", "run x")]);
        let good = encode_copy(&base, Layout::Single, 64, 0).unwrap();
        for _ in 0..5000 {
            let mut data = good[CRC_LEN..].to_vec();
            for _ in 0..(rand() % 4 + 1) {
                let i = (rand() as usize) % data.len();
                data[i] = rand() as u8;
            }
            if let Ok(e) = UBootEnv::parse_data(&data) {
                let again = e.encode_data(data.len()).unwrap();
                assert_eq!(UBootEnv::parse_data(&again).unwrap(), e);
            }
        }
    }
}
