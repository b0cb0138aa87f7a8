//! Backend choice, in one place. Burn 0.22 picks the backend at run time through one
//! `Device` type, so every model in the course is written once and runs on any of them.

use burn::tensor::Device;
use std::fmt;
use std::str::FromStr;

/// The backends this build was compiled with (cargo features decide the GPU ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// burn-ndarray: the course's reference CPU backend (simple, eager, well tested).
    Ndarray,
    /// burn-flex: Burn's newer pure-Rust CPU backend.
    Flex,
    /// burn-wgpu: WebGPU kernels through Vulkan, Metal or DX12 (or a software Vulkan driver).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// CubeCL's CUDA runtime (cargo feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda,
    /// WGPU pinned to Vulkan with SPIR-V kernels (cargo feature `vulkan`).
    #[cfg(feature = "vulkan")]
    Vulkan,
    /// WGPU pinned to Metal (cargo feature `metal`).
    #[cfg(feature = "metal")]
    Metal,
}

impl Backend {
    /// Every backend compiled into this binary, in the order the course presents them.
    pub const ALL: &'static [Backend] = &[
        Backend::Ndarray,
        Backend::Flex,
        #[cfg(feature = "wgpu")]
        Backend::Wgpu,
        #[cfg(feature = "cuda")]
        Backend::Cuda,
        #[cfg(feature = "vulkan")]
        Backend::Vulkan,
        #[cfg(feature = "metal")]
        Backend::Metal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Ndarray => "ndarray",
            Backend::Flex => "flex",
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => "wgpu",
            #[cfg(feature = "cuda")]
            Backend::Cuda => "cuda",
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => "vulkan",
            #[cfg(feature = "metal")]
            Backend::Metal => "metal",
        }
    }

    // ANCHOR: device
    /// The inference device (no autodiff). Training code calls `.autodiff()` on it.
    pub fn device(self) -> Device {
        match self {
            // ndarray is deprecated in Burn 0.22 in favour of flex, but it is the simplest CPU
            // backend and the reference the course compares every other backend against.
            #[allow(deprecated)]
            Backend::Ndarray => Device::ndarray(),
            Backend::Flex => Device::flex(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Device::cuda(0),
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => Device::vulkan(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(feature = "metal")]
            Backend::Metal => Device::metal(burn::tensor::DeviceKind::DefaultDevice),
        }
    }
    // ANCHOR_END: device

    /// True for the backends that run on the CPU itself (no GPU driver involved).
    pub fn is_cpu(self) -> bool {
        matches!(self, Backend::Ndarray | Backend::Flex)
    }

    pub fn available() -> String {
        Self::ALL
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|b| b.name() == wanted)
            .ok_or_else(|| {
                let known = ["ndarray", "flex", "wgpu", "cuda", "vulkan", "metal"];
                let hint = if known.contains(&wanted.as_str()) {
                    format!(" (this binary was built without the `{wanted}` cargo feature)")
                } else {
                    String::new()
                };
                format!(
                    "unknown backend '{s}'{hint}; available: {}",
                    Self::available()
                )
            })
    }
}
