//! What this host offers for isolation (its KVM, with the evidence) and which sandbox
//! backend the daemon uses, with the reason in plain words: for GET /health, the
//! management API's pools and `sessiond host`.

use serde::Serialize;
use vmm::capability::{KvmCapability, KvmKind};

/// The backend pools run on. The microVM engine exists (`vmm`, `vmm_jail`), but no pool
/// backend uses it yet, so this is the jail whatever KVM can do.
pub const POOL_BACKEND: &str = "jail";

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub kvm: KvmCapability,
    /// Whether a Linux guest can run (at a useful speed) in a microVM here.
    pub can_boot_linux: bool,
    /// The sandbox backend pools use.
    pub backend: &'static str,
    /// Why that backend, for a person.
    pub reason: String,
}

/// Inspects this host.
pub fn detect() -> HostReport {
    report(vmm::detect())
}

fn report(kvm: KvmCapability) -> HostReport {
    let reason = match kvm.kind {
        KvmKind::SoftwareAssisted => {
            let mut evidence: Vec<String> = kvm
                .kvm_modules
                .iter()
                .filter(|m| m.as_str() == "kvm_pvm")
                .cloned()
                .collect();
            if kvm.cpu_virt_flag.is_none() {
                evidence.push("no vmx/svm".to_owned());
            }
            format!(
                "KVM here is software-assisted ({}): guest kernel code is emulated and Linux \
                 guests cannot run user processes; using the {POOL_BACKEND} backend",
                evidence.join(", ")
            )
        }
        KvmKind::Hardware => format!(
            "KVM has hardware virtualization ({}): microVMs can run here, but no pool backend \
             uses them yet; using the {POOL_BACKEND} backend",
            kvm.cpu_virt_flag.as_deref().unwrap_or("vmx/svm")
        ),
        KvmKind::Absent => format!("{}; using the {POOL_BACKEND} backend", kvm.summary),
    };
    HostReport {
        can_boot_linux: kvm.can_boot_linux(),
        kvm,
        backend: POOL_BACKEND,
        reason,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl HostReport {
    /// The report for a terminal, evidence first.
    pub fn to_text(&self) -> String {
        let k = &self.kvm;
        let kind = match k.kind {
            KvmKind::Absent => "absent",
            KvmKind::Hardware => "hardware virtualization",
            KvmKind::SoftwareAssisted => "software-assisted",
        };
        let flag = k
            .cpu_virt_flag
            .clone()
            .unwrap_or_else(|| "none (no vmx/svm in /proc/cpuinfo)".to_owned());
        let modules = if k.kvm_modules.is_empty() {
            "none".to_owned()
        } else {
            k.kvm_modules.join(", ")
        };
        format!(
            "KVM:               {kind}\n\
             /dev/kvm present:  {}\n\
             /dev/kvm usable:   {}\n\
             CPU virt flag:     {flag}\n\
             KVM modules:       {modules}\n\
             Linux microVMs:    {}\n\
             \n\
             {}\n\
             \n\
             Sandbox backend:   {}\n\
             {}\n",
            yes_no(k.dev_kvm_present),
            yes_no(k.dev_kvm_usable),
            if self.can_boot_linux {
                "can boot"
            } else {
                "cannot boot"
            },
            k.summary,
            self.backend,
            self.reason,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(kind: KvmKind, flag: Option<&str>, modules: &[&str]) -> KvmCapability {
        KvmCapability {
            kind,
            dev_kvm_present: kind != KvmKind::Absent,
            dev_kvm_usable: kind != KvmKind::Absent,
            cpu_virt_flag: flag.map(str::to_owned),
            kvm_modules: modules.iter().map(|m| m.to_string()).collect(),
            summary: "summary".to_owned(),
        }
    }

    #[test]
    fn the_reason_names_the_evidence_and_the_backend() {
        let pvm = report(cap(KvmKind::SoftwareAssisted, None, &["kvm", "kvm_pvm"]));
        assert_eq!(
            pvm.reason,
            "KVM here is software-assisted (kvm_pvm, no vmx/svm): guest kernel code is \
             emulated and Linux guests cannot run user processes; using the jail backend"
        );
        assert!(!pvm.can_boot_linux);
        let hw = report(cap(KvmKind::Hardware, Some("vmx"), &["kvm", "kvm_intel"]));
        assert!(hw.can_boot_linux);
        assert!(hw.reason.contains("(vmx)") && hw.reason.ends_with("using the jail backend"));
        let none = report(cap(KvmKind::Absent, None, &[]));
        assert!(none.reason.starts_with("summary;"));
        let text = pvm.to_text();
        assert!(text.contains("software-assisted") && text.contains("kvm, kvm_pvm"));
        assert!(text.contains("no vmx/svm in /proc/cpuinfo"));
        let json = serde_json::to_value(&pvm).unwrap();
        assert_eq!(json["kvm"]["kind"], "software_assisted");
        assert_eq!(json["backend"], "jail");
    }
}
