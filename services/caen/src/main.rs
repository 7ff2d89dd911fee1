//! `caen-fsm --config FILE [--check]`: the CAEN power-supply service.

fn main() -> std::process::ExitCode {
    dcs_shared::program::main::<caen::CaenFsm>()
}
