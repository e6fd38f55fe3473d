//! The order's state machine (DESIGN.md section 2, seed 004's flows), in one place.
//!
//! [`next`] is a `match` on the order's status and what just happened to it: an event
//! one of the modules recorded, or a change a client asks for. It answers what the
//! order does next, as steps, each taken by one module (consumer group):
//! - the consumer groups take their steps from it, and read only the event types for
//!   which it can give them one ([`Module::reacts_to`], derived from [`next`]);
//! - the commands (cancel, dispatch, deliver) are allowed or refused by it, here and
//!   nowhere else;
//! - the orders module's steps are the statuses it moves the order to, and
//!   [`Status::recorded_by`] names the event that records each status, which is what
//!   `apply` sets the status from.
//!
//! Whether a step given here still has something to do (a redelivered event finds
//! its effect already there) is [`Step::is_due`].

use crate::events::EventType;
use crate::order::{InventoryHold, Order, PaymentState, ShipmentState, Status};
use std::sync::LazyLock;
use strum::VariantArray;

/// What happens to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A module recorded this event of the order.
    Event(EventType),
    /// A client asks to cancel the order (`POST /orders/{id}/cancel`).
    Cancel,
    /// The carrier picked the shipment up (`POST /shipments/{id}/dispatch`).
    Dispatch,
    /// The carrier delivered it (`POST /shipments/{id}/deliver`).
    Deliver,
    /// The order's saga ran out of time (seed 003, `NODE_SAGA_TIMEOUT_MS`): it was
    /// placed that long ago and is still not paid.
    SagaTimeout,
}

/// What an order does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// These steps follow; each module takes its own.
    Steps(&'static [Step]),
    /// Nothing follows.
    Nothing,
    /// A client asked for a change the order's state does not allow.
    Refused,
}

/// One module's part of what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Inventory(InventoryStep),
    Payments(PaymentStep),
    Shipments(ShipmentStep),
    /// The orders module moves the order to this status.
    Orders(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InventoryStep {
    /// Reserve the order's stock, or fail to (`InventoryReserved`,
    /// `InventoryReservationFailed`).
    Reserve,
    /// Give reserved stock back (`InventoryReleased`).
    Release(ReleaseReason),
}

/// The `reason` of an `OrderCancelled` the saga timeout decided (API.md).
pub const SAGA_TIMEOUT_REASON: &str = "saga_timeout";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    OrderCancelled,
    PaymentFailed,
}

impl ReleaseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::OrderCancelled => "order_cancelled",
            ReleaseReason::PaymentFailed => "payment_failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStep {
    /// Charge the order (`PaymentProcessed`, `PaymentFailed`).
    Charge,
    /// Pay a charged order back (`PaymentRefunded`).
    Refund,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShipmentStep {
    /// `ShipmentCreated`
    Create,
    /// `ShipmentDispatched`
    Dispatch,
    /// `ShipmentDelivered`
    Deliver,
}

/// The order's state machine. `status` and `shipment` are the order's as it stands
/// now, with `input` already applied when it is an event.
pub fn next(status: Status, shipment: Option<ShipmentState>, input: Input) -> Next {
    use EventType as E;
    use Input::Event;
    use InventoryStep::{Release, Reserve};
    use PaymentStep::{Charge, Refund};
    use ShipmentStep::{Create, Deliver, Dispatch};
    use Status::*;
    use Step::{Inventory, Orders, Payments, Shipments};
    match (status, input) {
        // Happy path: OrderPlaced -> InventoryReserved -> OrderConfirmed -> PaymentProcessed
        // -> OrderPaid -> ShipmentCreated -> OrderShipped.
        (Pending, Event(E::OrderPlaced)) => Next::Steps(&[Inventory(Reserve)]),
        (Pending, Event(E::InventoryReserved)) => Next::Steps(&[Orders(Confirmed)]),
        (Confirmed, Event(E::OrderConfirmed)) => Next::Steps(&[Payments(Charge)]),
        (Confirmed, Event(E::PaymentProcessed)) => Next::Steps(&[Orders(Paid)]),
        (Paid, Event(E::OrderPaid)) => Next::Steps(&[Shipments(Create)]),
        (Paid, Event(E::ShipmentCreated)) => Next::Steps(&[Orders(Shipped)]),
        // Later: ShipmentDispatched, ShipmentDelivered -> OrderDelivered.
        (Shipped, Input::Dispatch) if shipment == Some(ShipmentState::Created) => {
            Next::Steps(&[Shipments(Dispatch)])
        }
        (Shipped, Input::Deliver) if shipment == Some(ShipmentState::Dispatched) => {
            Next::Steps(&[Shipments(Deliver)])
        }
        (Shipped, Event(E::ShipmentDelivered)) => Next::Steps(&[Orders(Delivered)]),

        // Insufficient stock (a race after the pre-check): InventoryReservationFailed
        // -> OrderRejected.
        (Pending, Event(E::InventoryReservationFailed)) => Next::Steps(&[Orders(Rejected)]),

        // Payment failure: PaymentFailed -> OrderPaymentFailed -> InventoryReleased.
        (Confirmed, Event(E::PaymentFailed)) => Next::Steps(&[Orders(PaymentFailed)]),
        (PaymentFailed, Event(E::OrderPaymentFailed)) => {
            Next::Steps(&[Inventory(Release(ReleaseReason::PaymentFailed))])
        }

        // Cancellation, from PENDING, CONFIRMED or PAID as long as nothing was shipped:
        // OrderCancelled -> InventoryReleased (and PaymentRefunded when it was paid).
        (Pending | Confirmed | Paid, Input::Cancel) if shipment.is_none() => {
            Next::Steps(&[Orders(Cancelled)])
        }
        // Saga timeout: an order still not paid when its time is up is compensated as a
        // cancellation is (OrderCancelled with reason `saga_timeout`, then the release
        // and, when a charge happened meanwhile, the refund). One that was paid, or
        // ended, has nothing to compensate.
        (Pending | Confirmed, Input::SagaTimeout) => Next::Steps(&[Orders(Cancelled)]),
        (_, Input::SagaTimeout) => Next::Nothing,
        (Cancelled, Event(E::OrderCancelled)) => Next::Steps(&[
            Inventory(Release(ReleaseReason::OrderCancelled)),
            Payments(Refund),
        ]),

        // Every other request is refused; every other event has no follow-up (the
        // step it would have caused was taken already, or the order moved on, e.g.
        // it was cancelled while a payment was on its way).
        (_, Input::Cancel | Input::Dispatch | Input::Deliver) => Next::Refused,
        (_, Event(_)) => Next::Nothing,
    }
}

impl Next {
    /// The step `module` takes, if any.
    pub fn step_of(self, module: Module) -> Option<Step> {
        match self {
            Next::Steps(steps) => steps.iter().copied().find(|s| s.module() == module),
            Next::Nothing | Next::Refused => None,
        }
    }
}

impl Step {
    pub fn module(self) -> Module {
        match self {
            Step::Inventory(_) => Module::Inventory,
            Step::Payments(_) => Module::Payments,
            Step::Shipments(_) => Module::Shipments,
            Step::Orders(_) => Module::Orders,
        }
    }

    /// Whether the step still has something to do: its effect is not recorded yet (a
    /// redelivered event finds it there), and there is something to give back.
    pub fn is_due(self, order: &Order) -> bool {
        match self {
            Step::Inventory(InventoryStep::Reserve) => order.inventory.is_none(),
            Step::Inventory(InventoryStep::Release(_)) => {
                order.inventory == Some(InventoryHold::Reserved)
            }
            Step::Payments(PaymentStep::Charge) => order.payment.is_none(),
            Step::Payments(PaymentStep::Refund) => order.payment == Some(PaymentState::Processed),
            Step::Shipments(ShipmentStep::Create) => order.shipment.is_none(),
            // The status (and shipment state) moves with these, so `next` already
            // gives nothing for a repeat.
            Step::Shipments(ShipmentStep::Dispatch | ShipmentStep::Deliver) | Step::Orders(_) => {
                true
            }
        }
    }

    pub fn inventory(self) -> Option<InventoryStep> {
        match self {
            Step::Inventory(s) => Some(s),
            _ => None,
        }
    }

    pub fn payments(self) -> Option<PaymentStep> {
        match self {
            Step::Payments(s) => Some(s),
            _ => None,
        }
    }

    pub fn shipments(self) -> Option<ShipmentStep> {
        match self {
            Step::Shipments(s) => Some(s),
            _ => None,
        }
    }

    pub fn orders(self) -> Option<Status> {
        match self {
            Step::Orders(s) => Some(s),
            _ => None,
        }
    }
}

impl Order {
    /// What this order does next on `input` ([`next`]).
    pub fn next(&self, input: Input) -> Next {
        next(self.status, self.shipment, input)
    }
}

impl Status {
    /// The event that puts an order in this status.
    pub fn recorded_by(self) -> EventType {
        match self {
            Status::Pending => EventType::OrderPlaced,
            Status::Confirmed => EventType::OrderConfirmed,
            Status::Paid => EventType::OrderPaid,
            Status::Shipped => EventType::OrderShipped,
            Status::Delivered => EventType::OrderDelivered,
            Status::Rejected => EventType::OrderRejected,
            Status::PaymentFailed => EventType::OrderPaymentFailed,
            Status::Cancelled => EventType::OrderCancelled,
        }
    }

    /// The status an event puts its order in, if it is one of the order's own.
    pub fn set_by(event: EventType) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.recorded_by() == event)
    }
}

/// The modules of the workflow; each is one consumer group on the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Inventory,
    Payments,
    Shipments,
    Orders,
}

impl Module {
    pub const ALL: [Module; 4] = [
        Module::Inventory,
        Module::Payments,
        Module::Shipments,
        Module::Orders,
    ];

    /// The consumer group's name.
    pub fn name(self) -> &'static str {
        match self {
            Module::Inventory => "inventory",
            Module::Payments => "payments",
            Module::Shipments => "shipments",
            Module::Orders => "orders",
        }
    }

    pub fn parse(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether some order state gives this module a step on `event`: the event types
    /// its consumer group reads (it acknowledges the rest unread). Derived from
    /// [`next`], so the two cannot disagree.
    pub fn reacts_to(self, event: EventType) -> bool {
        REACTIONS[self as usize] & (1 << event as u32) != 0
    }
}

/// Per module, a bit per event type it can get a step on (see [`Module::reacts_to`]).
static REACTIONS: LazyLock<[u32; 4]> = LazyLock::new(|| {
    const { assert!(EventType::VARIANTS.len() <= 32) };
    let shipments = [
        None,
        Some(ShipmentState::Created),
        Some(ShipmentState::Dispatched),
        Some(ShipmentState::Delivered),
    ];
    let mut bits = [0u32; 4];
    for &event in EventType::VARIANTS {
        for status in Status::ALL {
            for shipment in shipments {
                if let Next::Steps(steps) = next(status, shipment, Input::Event(event)) {
                    for step in steps {
                        bits[step.module() as usize] |= 1 << event as u32;
                    }
                }
            }
        }
    }
    bits
});

#[cfg(test)]
mod tests {
    use super::*;
    use EventType as E;

    #[test]
    fn consumer_groups_read_the_events_the_flows_name() {
        let reads = |m: Module| -> Vec<EventType> {
            E::VARIANTS
                .iter()
                .copied()
                .filter(|e| m.reacts_to(*e))
                .collect()
        };
        use EventType::*;
        assert_eq!(
            reads(Module::Inventory),
            [OrderPlaced, OrderPaymentFailed, OrderCancelled]
        );
        assert_eq!(reads(Module::Payments), [OrderConfirmed, OrderCancelled]);
        assert_eq!(reads(Module::Shipments), [OrderPaid]);
        assert_eq!(
            reads(Module::Orders),
            [
                InventoryReserved,
                InventoryReservationFailed,
                PaymentProcessed,
                PaymentFailed,
                ShipmentCreated,
                ShipmentDelivered
            ]
        );
    }

    #[test]
    fn cancelling_is_allowed_until_something_ships() {
        for status in Status::ALL {
            let allowed = matches!(next(status, None, Input::Cancel), Next::Steps(_));
            assert_eq!(
                allowed,
                matches!(status, Status::Pending | Status::Confirmed | Status::Paid),
                "{status}"
            );
        }
        // A shipment created while the order is still PAID: too late.
        let late = next(Status::Paid, Some(ShipmentState::Created), Input::Cancel);
        assert_eq!(late, Next::Refused);
    }

    #[test]
    fn a_shipment_is_dispatched_then_delivered_once() {
        let (shipped, created, dispatched) = (
            Status::Shipped,
            Some(ShipmentState::Created),
            Some(ShipmentState::Dispatched),
        );
        assert!(matches!(
            next(shipped, created, Input::Dispatch),
            Next::Steps(_)
        ));
        assert_eq!(next(shipped, dispatched, Input::Dispatch), Next::Refused);
        assert_eq!(next(shipped, created, Input::Deliver), Next::Refused);
        assert!(matches!(
            next(shipped, dispatched, Input::Deliver),
            Next::Steps(_)
        ));
        assert_eq!(next(Status::Paid, created, Input::Dispatch), Next::Refused);
    }

    #[test]
    fn each_status_is_recorded_by_its_own_event() {
        for status in Status::ALL {
            assert_eq!(Status::set_by(status.recorded_by()), Some(status));
        }
        assert_eq!(Status::set_by(E::InventoryReserved), None);
    }

    #[test]
    fn the_saga_timeout_cancels_only_orders_not_yet_paid() {
        for status in Status::ALL {
            let due = next(status, None, Input::SagaTimeout);
            let expected = match status {
                Status::Pending | Status::Confirmed => {
                    Next::Steps(&[Step::Orders(Status::Cancelled)])
                }
                _ => Next::Nothing,
            };
            assert_eq!(due, expected, "{status}");
        }
        // Never refused: a timed-out order that moved on simply has nothing to undo.
        assert_eq!(
            next(
                Status::Shipped,
                Some(ShipmentState::Created),
                Input::SagaTimeout
            ),
            Next::Nothing
        );
    }

    #[test]
    fn a_cancellation_releases_and_refunds() {
        let next = next(Status::Cancelled, None, Input::Event(E::OrderCancelled));
        assert_eq!(
            next.step_of(Module::Inventory),
            Some(Step::Inventory(InventoryStep::Release(
                ReleaseReason::OrderCancelled
            )))
        );
        assert_eq!(
            next.step_of(Module::Payments),
            Some(Step::Payments(PaymentStep::Refund))
        );
        assert_eq!(next.step_of(Module::Shipments), None);
    }
}
