//! The live device sessions: who is connected, how to push to them, and which
//! download token belongs to which device. In memory only: a device that is
//! not connected simply gets its target when it next connects.

use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;
use uplift_proto::channel::ServerMsg;
use uplift_proto::DeviceId;

/// Pushes queued per device before the session is considered stuck.
pub const PUSH_QUEUE: usize = 16;

#[derive(Debug, Default)]
pub struct Hub {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_serial: u64,
    sessions: HashMap<DeviceId, Session>,
    tokens: HashMap<String, DeviceId>,
}

#[derive(Debug)]
struct Session {
    serial: u64,
    token: String,
    tx: mpsc::Sender<ServerMsg>,
}

/// Identifies one session so a stale session's cleanup cannot remove its
/// replacement (a device that reconnects before the old socket times out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSerial(u64);

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain maps behind; still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a session, replacing (and thereby closing) any older one of
    /// the same device.
    pub fn register(
        &self,
        device: DeviceId,
        token: String,
        tx: mpsc::Sender<ServerMsg>,
    ) -> SessionSerial {
        let mut inner = self.lock();
        inner.next_serial += 1;
        let serial = inner.next_serial;
        inner.tokens.insert(token.clone(), device.clone());
        if let Some(old) = inner.sessions.insert(device, Session { serial, token, tx }) {
            inner.tokens.remove(&old.token);
        }
        SessionSerial(serial)
    }

    pub fn unregister(&self, device: &DeviceId, serial: SessionSerial) {
        let mut inner = self.lock();
        if inner
            .sessions
            .get(device)
            .is_some_and(|s| s.serial == serial.0)
        {
            if let Some(old) = inner.sessions.remove(device) {
                inner.tokens.remove(&old.token);
            }
        }
    }

    pub fn device_for_token(&self, token: &str) -> Option<DeviceId> {
        self.lock().tokens.get(token).cloned()
    }

    pub fn is_online(&self, device: &DeviceId) -> bool {
        self.lock().sessions.contains_key(device)
    }

    pub fn online_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Queues a message for a connected device. Returns false if the device is
    /// offline or its queue is full (it gets the current target on reconnect).
    pub fn push(&self, device: &DeviceId, msg: ServerMsg) -> bool {
        let tx = self.lock().sessions.get(device).map(|s| s.tx.clone());
        match tx {
            Some(tx) => tx.try_send(msg).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_session_cannot_unregister_its_replacement() {
        let hub = Hub::default();
        let dev: DeviceId = "dev-1".parse().unwrap();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, mut rx2) = mpsc::channel(1);
        let old = hub.register(dev.clone(), "t1".into(), tx1);
        let _new = hub.register(dev.clone(), "t2".into(), tx2);
        hub.unregister(&dev, old);
        assert!(hub.is_online(&dev));
        assert_eq!(
            hub.device_for_token("t1"),
            None,
            "the old session's token is revoked"
        );
        assert_eq!(hub.device_for_token("t2"), Some(dev.clone()));
        assert!(hub.push(&dev, ServerMsg::NoUpdate));
        assert_eq!(rx2.try_recv().unwrap(), ServerMsg::NoUpdate);
    }
}
