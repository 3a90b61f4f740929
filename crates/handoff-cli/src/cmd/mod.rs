//! One module per subcommand: its arguments (clap derive) and what it does,
//! calling the libraries.

pub mod compare;
pub mod convert;
pub mod init;
pub mod quantize;
pub mod report;
pub mod run;
pub mod serve;
pub mod setup;

/// `--device`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl From<DeviceArg> for handoff_backend::Device {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cpu => Self::Cpu,
            DeviceArg::Cuda => Self::Cuda,
        }
    }
}
