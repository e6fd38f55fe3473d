//! Payments: the simulated payment provider and the `payments` consumer group that
//! charges confirmed orders and refunds cancelled ones.
//!
//! The provider's outcome is decided by the test token (API.md), so every failure
//! path is reachable from outside without mocks inside the code.

use crate::store::Tx;
use crate::workflow::{Delivery, Reaction, Workflow, WorkflowError};
use orders_model::events::*;
use orders_model::flow::PaymentStep;
use orders_model::pii::Field;
use orders_model::{OrderId, Step};

/// What the provider said about a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    Approved,
    Declined(&'static str),
}

/// The simulated provider. `attempt` counts from 1 for each delivery of the step.
/// A real provider would be called with the order id as its idempotency key, so that
/// a charge repeated after a crash (before our commit) is not taken twice.
pub fn charge(token: &str, attempt: u32) -> Result<Charge, WorkflowError> {
    match token {
        "tok_ok" => Ok(Charge::Approved),
        "tok_decline" => Ok(Charge::Declined("card_declined")),
        "tok_flaky" if attempt <= 1 => Err(WorkflowError::Provider(
            "provider timed out (tok_flaky, first attempt)".into(),
        )),
        "tok_flaky" => Ok(Charge::Approved),
        "tok_error" => Err(WorkflowError::Provider("provider error (tok_error)".into())),
        _ => Ok(Charge::Declined("invalid_token")),
    }
}

/// Payment ids are derived from the order: one order, one payment, whichever node
/// or region charges it.
pub fn payment_id(order_id: &OrderId) -> String {
    format!("pay_{}", order_id.as_str().replace('-', ""))
}

/// The `payments` group: charges confirmed orders, refunds cancelled ones that were
/// charged.
pub async fn on_event(wf: &Workflow, d: &Delivery<'_>) -> Result<Option<Tx>, WorkflowError> {
    wf.react(d, None, Step::payments, |_, order, step| {
        let order_id = order.order_id.clone();
        Ok(Reaction::Next(match step {
            PaymentStep::Charge => {
                let payment_id = payment_id(&order_id);
                // Opened only here, for the provider, and never kept.
                let token = wf
                    .pii
                    .open(Field::PaymentToken, order_id.as_str(), &order.payment_token)
                    .map_err(|e| WorkflowError::Sealed(e.to_string()))?;
                match charge(&token, d.attempt)? {
                    Charge::Approved => DomainEvent::PaymentProcessed(PaymentProcessed {
                        order_id,
                        payment_id,
                        amount: order.amount,
                        currency: order.currency.clone(),
                    }),
                    Charge::Declined(reason) => DomainEvent::PaymentFailed(PaymentFailed {
                        order_id,
                        payment_id,
                        reason: reason.into(),
                    }),
                }
            }
            PaymentStep::Refund => DomainEvent::PaymentRefunded(PaymentProcessed {
                payment_id: order
                    .payment_id
                    .clone()
                    .unwrap_or_else(|| payment_id(&order_id)),
                order_id,
                amount: order.amount,
                currency: order.currency.clone(),
            }),
        }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decide_the_outcome() {
        assert_eq!(charge("tok_ok", 1).unwrap(), Charge::Approved);
        assert_eq!(
            charge("tok_decline", 1).unwrap(),
            Charge::Declined("card_declined")
        );
        assert!(charge("tok_flaky", 1).is_err());
        assert_eq!(charge("tok_flaky", 2).unwrap(), Charge::Approved);
        assert!(charge("tok_error", 3).is_err());
    }
}
