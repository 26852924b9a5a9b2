//! Which PKCS#11 module the token suites run on: ONE setting, `XKS_TEST_PKCS11`.
//!
//! - unset or `softhsm2`: SoftHSM2 from the usual places (scripts/setup.sh installs it).
//! - `kryoptic`: kryoptic's `libkryoptic_pkcs11.so`, from `XKS_KRYOPTIC_MODULE` or else
//!   where scripts/kryoptic.sh caches it (it prints the path; scripts/check-kryoptic.sh
//!   sets the variable).
//!
//! A suite that makes its token with [`Setup`] gets the module through `quickstart
//! --module`; one that loads the module in process takes [`module()`] and calls
//! [`Setup::module_environment`] before the first `C_Initialize`. docs/kryoptic.md.

use std::path::PathBuf;

use super::*;

/// The soft token under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestModule {
    SoftHsm2,
    Kryoptic,
}

/// kryoptic's version that scripts/kryoptic.sh builds by default.
pub const KRYOPTIC_VERSION: &str = "1.5.4";

impl TestModule {
    /// From `XKS_TEST_PKCS11`; an unknown value fails the test (no silent fallback).
    pub fn selected() -> Self {
        match std::env::var("XKS_TEST_PKCS11").as_deref() {
            Err(_) | Ok("") | Ok("softhsm2") => Self::SoftHsm2,
            Ok("kryoptic") => Self::Kryoptic,
            Ok(other) => panic!("XKS_TEST_PKCS11={other:?}: expected softhsm2 or kryoptic"),
        }
    }

    /// The module's path; panics with how to get it when it is missing.
    pub fn path(self) -> PathBuf {
        match self {
            Self::SoftHsm2 => xks_proxy::quickstart::find_softhsm2()
                .unwrap_or_else(|e| panic!("{e} (run scripts/setup.sh)")),
            Self::Kryoptic => {
                let path = std::env::var_os("XKS_KRYOPTIC_MODULE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        let cache = std::env::var_os("XKS_CACHE_DIR")
                            .map(PathBuf::from)
                            .unwrap_or_else(|| {
                                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                                    .join(".cache/xks-proxy")
                            });
                        cache
                            .join("kryoptic")
                            .join(KRYOPTIC_VERSION)
                            .join("libkryoptic_pkcs11.so")
                    });
                assert!(
                    path.exists(),
                    "XKS_TEST_PKCS11=kryoptic but {} is missing: build it with \
                     scripts/kryoptic.sh (or set XKS_KRYOPTIC_MODULE)",
                    path.display()
                );
                path
            }
        }
    }

    /// The token's manufacturerID, which GetHealthStatus reports as `ekmVendor`.
    pub fn manufacturer(self) -> &'static str {
        match self {
            Self::SoftHsm2 => "SoftHSM project",
            Self::Kryoptic => "Kryoptic Project",
        }
    }

    /// A word of the EKM's `model` in GetHealthStatus (the library description with the
    /// manufacturer and token model: "SoftHSM ...", "Kryoptic Project v1 ...").
    pub fn model_word(self) -> &'static str {
        match self {
            Self::SoftHsm2 => "SoftHSM",
            Self::Kryoptic => "Kryoptic",
        }
    }

    /// The variable naming the module's configuration file in a quickstart folder.
    pub fn conf_variable(self) -> (&'static str, &'static str) {
        match self {
            Self::SoftHsm2 => ("SOFTHSM2_CONF", "softhsm2.conf"),
            Self::Kryoptic => ("KRYOPTIC_CONF", "kryoptic.conf"),
        }
    }
}

/// The module the token suites run on (see the module's docs).
pub fn module() -> TestModule {
    TestModule::selected()
}

/// The selected module's path.
pub fn module_path() -> PathBuf {
    module().path()
}

impl Setup {
    /// Where the quickstart token's objects live: SoftHSM2's token directory under
    /// `tokens/`, kryoptic's first slot's sqlite file. Moving it away is the token gone.
    pub fn token_store(&self) -> PathBuf {
        match module() {
            TestModule::SoftHsm2 => std::fs::read_dir(self.path("tokens"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.is_dir())
                .unwrap(),
            TestModule::Kryoptic => self.path("tokens/slot1.sql"),
        }
    }

    /// Points this process's module environment at this folder's token store
    /// (SOFTHSM2_CONF or KRYOPTIC_CONF): call it before the module's first C_Initialize
    /// in process, while no other thread reads the environment.
    pub fn module_environment(&self) {
        let (name, file) = module().conf_variable();
        std::env::set_var(name, self.path(file));
    }
}
