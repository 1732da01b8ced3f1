//! Local mode's records: one file per entry, written atomically, so an interrupted run
//! resumes with `--resume`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::swarm::record::{Store, StoreError};

pub struct Files {
    dir: PathBuf,
}

impl Files {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
}

impl Store for Files {
    async fn load(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let mut entries = BTreeMap::new();
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
            Err(e) => return Err(StoreError::backend("reading", self.dir.display())(e)),
        };
        for entry in listing.filter_map(Result::ok) {
            let path = entry.path();
            let Some(key) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if key.ends_with(".part") {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .map_err(StoreError::backend("reading", path.display()))?;
            entries.insert(key.to_owned(), text);
        }
        Ok(entries)
    }

    async fn save(&self, entries: Vec<(String, String)>) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(StoreError::backend("creating", self.dir.display()))?;
        for (key, value) in entries {
            let path = self.dir.join(&key);
            let part = self.dir.join(format!("{key}.part"));
            std::fs::write(&part, value)
                .and_then(|()| std::fs::rename(&part, &path))
                .map_err(StoreError::backend("writing", path.display()))?;
        }
        Ok(())
    }
}
