//! Minimal KVM virtual machine monitor (issue 3; under construction).
