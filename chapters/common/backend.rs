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

    /// The device of the `n`-th process on this machine (chapter 11): on a GPU backend the
    /// `n`-th GPU, so that the ranks of one machine do not share one; on a CPU, the CPU.
    pub fn device_for_local_rank(self, n: usize) -> Device {
        match (self, n) {
            (_, 0) => self.device(),
            #[cfg(feature = "wgpu")]
            (Backend::Wgpu, n) => Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(n)),
            #[cfg(feature = "cuda")]
            (Backend::Cuda, n) => Device::cuda(n),
            #[cfg(feature = "vulkan")]
            (Backend::Vulkan, n) => Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(n)),
            #[cfg(feature = "metal")]
            (Backend::Metal, n) => Device::metal(burn::tensor::DeviceKind::DiscreteGpu(n)),
            _ => self.device(),
        }
    }

    /// The device, once the backend is known to run here: without a usable GPU adapter,
    /// Burn's wgpu backend panics on its first tensor, deep inside, so a GPU backend is
    /// checked first and refused with one line that names the fix.
    pub fn open(self) -> anyhow::Result<Device> {
        #[cfg(feature = "wgpu")]
        if self == Backend::Wgpu {
            check_wgpu_adapters()?;
        }
        Ok(self.device())
    }

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

// ANCHOR: check_wgpu
/// What to install when wgpu has nothing it can run on.
#[cfg(feature = "wgpu")]
const VULKAN_FIX: &str = "install your GPU's driver with Vulkan support, or Mesa's software \
     Vulkan driver (Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1)";

/// Refuses a machine where wgpu finds no adapter, or only OpenGL ones: Burn's kernels use
/// 64-bit integers, which wgpu's OpenGL backend cannot compile (it fails mid-run with a
/// shader validation error).
#[cfg(feature = "wgpu")]
fn check_wgpu_adapters() -> anyhow::Result<()> {
    let instance = wgpu::Instance::default();
    let adapters =
        futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    if infos.is_empty() {
        anyhow::bail!("--backend wgpu: no GPU adapter found; {VULKAN_FIX}");
    }
    if infos.iter().all(|i| i.backend == wgpu::Backend::Gl) {
        let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
        anyhow::bail!(
            "--backend wgpu: only OpenGL adapters found ({}), which cannot run Burn's kernels \
             (they need 64-bit integers); {VULKAN_FIX}",
            names.join(", ")
        );
    }
    Ok(())
}
// ANCHOR_END: check_wgpu
