//! A Secret or ConfigMap volume laid out as the kubelet lays it out (its `AtomicWriter`):
//! the files live in a timestamped folder, `..data` is a symlink to it, and each file
//! name is a symlink through `..data`:
//!
//! ```text
//! tls.crt -> ..data/tls.crt
//! ..data  -> ..2026_12_04_21_00_00.000000001
//! ..2026_12_04_21_00_00.000000001/tls.crt
//! ```
//!
//! An update writes a new timestamped folder, points a new `..data_tmp` symlink at it,
//! renames `..data_tmp` over `..data` (one atomic rename: a reader sees all old or
//! all new files) and removes the old folder. The file-name symlinks never change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A volume's mount point.
pub struct KubeletVolume {
    pub dir: PathBuf,
    current: Option<PathBuf>,
}

static GENERATION: AtomicU32 = AtomicU32::new(0);

impl KubeletVolume {
    /// Creates the mount point `dir` with `files` (name, content).
    pub fn new(dir: &Path, files: &[(&str, &[u8])]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut volume = Self {
            dir: dir.to_owned(),
            current: None,
        };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
        }
        volume
    }

    /// The kubelet's atomic update: new folder, `..data_tmp`, rename over `..data`,
    /// old folder removed.
    pub fn update(&mut self, files: &[(&str, &[u8])]) {
        let stamp = format!(
            "..2026_12_04_21_00_00.{:09}",
            GENERATION.fetch_add(1, Ordering::Relaxed)
        );
        let folder = self.dir.join(&stamp);
        std::fs::create_dir(&folder).unwrap();
        for (name, content) in files {
            std::fs::write(folder.join(name), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&stamp, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(folder) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }
}
