//! Stop signals for the simulator: SIGTERM and SIGINT set a flag (so the
//! simulator can pass the signal on to the agent and wait for it), and the
//! agent gets a SIGTERM rather than a SIGKILL so it can shut down cleanly.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::io;
use std::process::Child;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Makes SIGTERM and SIGINT set the returned flag instead of killing the simulator.
pub fn install_stop_handler() -> io::Result<&'static AtomicBool> {
    let flag = STOP.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signo in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signo, flag.clone())?;
    }
    Ok(flag)
}

/// Sends SIGTERM to a child that has not been waited for yet (so its pid
/// cannot have been reused), and to the rest of its process group, which it
/// leads: a shutdown reaches everything the "OS" started.
pub fn terminate(child: &Child) -> io::Result<()> {
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    kill(Pid::from_raw(pid), Signal::SIGTERM).map_err(io::Error::from)?;
    // The child itself has the signal; a group already gone is fine.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    Ok(())
}

/// SIGKILLs the child's whole process group (the child leads it, see
/// `run`): a reset ends every process of the "OS", not only the agent.
pub fn reset(child: &Child) -> io::Result<()> {
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    killpg(Pid::from_raw(pid), Signal::SIGKILL).map_err(io::Error::from)
}
