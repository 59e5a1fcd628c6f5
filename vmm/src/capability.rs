//! What this host's KVM can do, with the evidence, so the daemon and CLI can say plainly why
//! a microVM backend will or will not boot Linux guests here.

use serde::Serialize;

/// The kind of KVM found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmKind {
    /// No usable /dev/kvm.
    Absent,
    /// Hardware virtualization (VT-x or AMD-V): Linux guests run at native speed.
    Hardware,
    /// /dev/kvm works but without VT-x/AMD-V (e.g. the `kvm_pvm` module): guest kernel mode
    /// is emulated instruction by instruction, so only tiny test guests are practical.
    SoftwareAssisted,
}

/// The verdict and what it rests on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmCapability {
    pub kind: KvmKind,
    /// `/dev/kvm` exists.
    pub dev_kvm_present: bool,
    /// `/dev/kvm` opened and answered KVM_GET_API_VERSION with 12.
    pub dev_kvm_usable: bool,
    /// `vmx` or `svm` among the CPU flags in /proc/cpuinfo.
    pub cpu_virt_flag: Option<String>,
    /// KVM modules loaded (from /sys/module), e.g. `kvm_intel`, `kvm_pvm`.
    pub kvm_modules: Vec<String>,
    /// One sentence for a person.
    pub summary: String,
}

impl KvmCapability {
    /// Whether a Linux guest can be booted at a useful speed.
    pub fn can_boot_linux(&self) -> bool {
        self.kind == KvmKind::Hardware
    }
}

/// Inspects this host.
pub fn detect() -> KvmCapability {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let modules = std::fs::read_dir("/sys/module")
        .map(|d| {
            let mut m: Vec<String> = d
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == "kvm" || n.starts_with("kvm_"))
                .collect();
            m.sort();
            m
        })
        .unwrap_or_default();
    let present = std::path::Path::new("/dev/kvm").exists();
    let usable = present
        && kvm_ioctls::Kvm::new()
            .map(|k| k.get_api_version() == 12)
            .unwrap_or(false);
    classify(&cpuinfo, modules, present, usable)
}

fn classify(cpuinfo: &str, modules: Vec<String>, present: bool, usable: bool) -> KvmCapability {
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find(|f| *f == "vmx" || *f == "svm")
        .map(str::to_owned);
    let pvm = modules.iter().any(|m| m == "kvm_pvm");
    let (kind, summary) = if !usable {
        let why = if present {
            "/dev/kvm exists but cannot be opened (permissions or a broken module)"
        } else {
            "/dev/kvm is missing (KVM module not loaded, or no virtualization on this host)"
        };
        (KvmKind::Absent, format!("no KVM: {why}"))
    } else if flag.is_some() && !pvm {
        (
            KvmKind::Hardware,
            "KVM with hardware virtualization: Linux microVMs can run".to_owned(),
        )
    } else {
        let evidence = match (&flag, pvm) {
            (_, true) => "the kvm_pvm module is loaded",
            _ => "the CPU has no vmx/svm flag",
        };
        (
            KvmKind::SoftwareAssisted,
            format!(
                "software-assisted KVM ({evidence}): guest kernel mode is emulated about 3000x \
                 slower than native, so Linux guests cannot be booted here; only tiny test \
                 guests run"
            ),
        )
    };
    KvmCapability {
        kind,
        dev_kvm_present: present,
        dev_kvm_usable: usable,
        cpu_virt_flag: flag,
        kvm_modules: modules,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_evidence() {
        let vmx = "processor : 0\nflags : fpu vme vmx sse\n";
        let plain = "flags : fpu sse\n";
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let hw = classify(vmx, m(&["kvm", "kvm_intel"]), true, true);
        assert_eq!(hw.kind, KvmKind::Hardware);
        assert_eq!(hw.cpu_virt_flag.as_deref(), Some("vmx"));
        assert!(hw.can_boot_linux());
        let pvm = classify(plain, m(&["kvm", "kvm_pvm"]), true, true);
        assert_eq!(pvm.kind, KvmKind::SoftwareAssisted);
        assert!(pvm.summary.contains("kvm_pvm"));
        assert_eq!(classify(plain, vec![], false, false).kind, KvmKind::Absent);
    }

    #[test]
    fn this_host_is_reported_consistently() {
        let c = detect();
        assert_eq!(c.dev_kvm_usable, c.kind != KvmKind::Absent);
        println!("{}", c.summary);
    }
}
