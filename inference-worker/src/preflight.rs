//! Checks of the model on disk before mistral.rs loads it, so a bad path or an unsupported
//! model ends the worker with one line that names the cause, not a panic.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// GGUF architectures mistral.rs 0.8.1 can run as quantized models (its `GGUFArchitecture`
/// variants that the GGUF pipeline builds a model for).
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral3",
    "phi2",
    "phi3",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "starcoder2",
];

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const ARCHITECTURE_KEY: &str = "general.architecture";
/// Keys and string values longer than this are not GGUF metadata but a corrupt file; the
/// bound keeps a bad length from allocating gigabytes.
const MAX_STRING_LEN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model path {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a GGUF file (no GGUF magic number)")]
    NotGguf(PathBuf),
    #[error("{path} is a truncated or corrupt GGUF file: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{0} has no general.architecture in its GGUF metadata")]
    NoArchitecture(PathBuf),
    #[error(
        "{path}: GGUF architecture `{architecture}` is not supported by mistral.rs 0.8.1 (supported: {}); Gemma 3/4 load from safetensors",
        SUPPORTED_GGUF_ARCHITECTURES.join(", ")
    )]
    Unsupported { path: PathBuf, architecture: String },
    #[error(
        "{0} has no config.json: a safetensors model is a directory with config.json, tokenizer.json and *.safetensors files"
    )]
    NotSafetensorsDir(PathBuf),
    #[error(
        "--isq quantizes safetensors weights while they load; a GGUF model is already quantized: drop --isq, or point --model-path at a safetensors directory"
    )]
    IsqOnGguf,
}

/// The `general.architecture` of a GGUF file, read from its header without loading tensors.
pub fn gguf_architecture(path: &Path) -> Result<String, Error> {
    let file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::Missing(path.to_owned()),
        _ => Error::Read {
            path: path.to_owned(),
            source,
        },
    })?;
    let mut reader = GgufReader {
        inner: BufReader::new(file),
        path,
    };
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic)?;
    if &magic != GGUF_MAGIC {
        return Err(Error::NotGguf(path.to_owned()));
    }
    let version = reader.u32()?;
    if !(2..=3).contains(&version) {
        return Err(reader.corrupt(format!("GGUF version {version}, expected 2 or 3")));
    }
    let _tensors = reader.u64()?;
    let entries = reader.u64()?;
    for _ in 0..entries {
        let key = reader.string()?;
        let kind = reader.u32()?;
        if key == ARCHITECTURE_KEY {
            if kind != STRING {
                return Err(reader.corrupt(format!(
                    "{ARCHITECTURE_KEY} has value type {kind}, expected a string"
                )));
            }
            return reader.string();
        }
        reader.skip_value(kind)?;
    }
    Err(Error::NoArchitecture(path.to_owned()))
}

/// Fails unless every GGUF file exists and declares an architecture mistral.rs can run.
pub fn check_gguf(files: &[PathBuf]) -> Result<String, Error> {
    let mut architecture = String::new();
    for path in files {
        architecture = gguf_architecture(path)?;
        if !SUPPORTED_GGUF_ARCHITECTURES.contains(&architecture.to_ascii_lowercase().as_str()) {
            return Err(Error::Unsupported {
                path: path.clone(),
                architecture,
            });
        }
    }
    Ok(architecture)
}

/// Fails unless `dir` looks like a Hugging Face safetensors model directory.
pub fn check_safetensors_dir(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return Err(Error::Missing(dir.to_owned()));
    }
    if !dir.join("config.json").is_file() {
        return Err(Error::NotSafetensorsDir(dir.to_owned()));
    }
    Ok(())
}

// GGUF metadata value types.
const STRING: u32 = 8;
const ARRAY: u32 = 9;

struct GgufReader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
}

impl GgufReader<'_> {
    fn corrupt(&self, what: String) -> Error {
        Error::Corrupt {
            path: self.path.to_owned(),
            what,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.corrupt("the header ends early".into()),
            _ => Error::Read {
                path: self.path.to_owned(),
                source: e,
            },
        })
    }

    fn u32(&mut self) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<String, Error> {
        let len = self.u64()?;
        if len > MAX_STRING_LEN {
            return Err(self.corrupt(format!("a metadata string claims {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_exact(&mut buf)?;
        String::from_utf8(buf).map_err(|_| self.corrupt("a metadata string is not UTF-8".into()))
    }

    fn skip(&mut self, bytes: u64) -> Result<(), Error> {
        let offset = i64::try_from(bytes)
            .map_err(|_| self.corrupt(format!("a value claims {bytes} bytes")))?;
        self.inner
            .seek(SeekFrom::Current(offset))
            .map(drop)
            .map_err(|source| Error::Read {
                path: self.path.to_owned(),
                source,
            })
    }

    fn skip_value(&mut self, kind: u32) -> Result<(), Error> {
        match kind {
            STRING => {
                let len = self.u64()?;
                self.skip(len)
            }
            ARRAY => {
                let element = self.u32()?;
                let count = self.u64()?;
                match scalar_size(element) {
                    Some(size) => {
                        let bytes = count
                            .checked_mul(size)
                            .ok_or_else(|| self.corrupt("an array overflows".into()))?;
                        self.skip(bytes)
                    }
                    None => (0..count).try_for_each(|_| self.skip_value(element)),
                }
            }
            other => match scalar_size(other) {
                Some(size) => self.skip(size),
                None => Err(self.corrupt(format!("unknown metadata value type {other}"))),
            },
        }
    }
}

fn scalar_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header with the given metadata, each entry (key, type, encoded value).
    fn gguf(entries: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((entries.len() as u64).to_le_bytes());
        for (key, kind, value) in entries {
            out.extend((key.len() as u64).to_le_bytes());
            out.extend(key.as_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        out
    }

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend(s.as_bytes());
        out
    }

    fn write(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kubeswarm-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn finds_the_architecture_after_other_metadata() {
        let mut array = STRING.to_le_bytes().to_vec();
        array.extend(2u64.to_le_bytes());
        array.extend(string("<s>"));
        array.extend(string("</s>"));
        let mut floats = 6u32.to_le_bytes().to_vec();
        floats.extend(3u64.to_le_bytes());
        floats.extend([0u8; 12]);
        let path = write(
            "qwen.gguf",
            &gguf(&[
                ("general.name", STRING, string("tiny")),
                ("tokenizer.ggml.tokens", ARRAY, array),
                ("tokenizer.ggml.scores", ARRAY, floats),
                ("general.file_type", 4, 2u32.to_le_bytes().to_vec()),
                ("general.architecture", STRING, string("qwen3")),
            ]),
        );
        assert_eq!(check_gguf(&[path]).unwrap(), "qwen3");
    }

    #[test]
    fn refuses_an_unsupported_architecture_naming_what_is_supported() {
        let path = write(
            "gemma.gguf",
            &gguf(&[("general.architecture", STRING, string("gemma3"))]),
        );
        let message = check_gguf(&[path]).unwrap_err().to_string();
        assert!(message.contains("`gemma3` is not supported"), "{message}");
        assert!(message.contains("llama, mistral3, phi2"), "{message}");
    }

    #[test]
    fn refuses_missing_foreign_and_truncated_files() {
        let missing = std::env::temp_dir().join("kubeswarm-no-such-model.gguf");
        assert!(matches!(check_gguf(&[missing]), Err(Error::Missing(_))));

        let text = write("notes.gguf", b"hello, this is not a model");
        assert!(matches!(check_gguf(&[text]), Err(Error::NotGguf(_))));

        let full = gguf(&[("general.architecture", STRING, string("llama"))]);
        let truncated = write("cut.gguf", &full[..full.len() - 3]);
        assert!(matches!(
            check_gguf(&[truncated]),
            Err(Error::Corrupt { .. })
        ));

        let mut huge = gguf(&[]);
        huge[16..24].copy_from_slice(&1u64.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        let bogus = write("bogus.gguf", &huge);
        assert!(matches!(check_gguf(&[bogus]), Err(Error::Corrupt { .. })));

        let nameless = write(
            "nameless.gguf",
            &gguf(&[("general.name", STRING, string("x"))]),
        );
        assert!(matches!(
            check_gguf(&[nameless]),
            Err(Error::NoArchitecture(_))
        ));
    }

    #[test]
    fn safetensors_needs_a_config() {
        let dir = std::env::temp_dir().join(format!("kubeswarm-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            check_safetensors_dir(&dir),
            Err(Error::NotSafetensorsDir(_))
        ));
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        check_safetensors_dir(&dir).unwrap();
    }
}
